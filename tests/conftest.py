import pytest
import torch

import alto_ext

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run bench/device_run.sh on the GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _sync_checks():
    # Index errors found on the GPU are raised by the op that hit them.
    alto_ext.set_sync_checks(True)
    yield
    alto_ext.set_sync_checks(False)


_SEED = int.from_bytes(__import__("os").urandom(4), "little")


def pytest_report_header(config):
    return f"alto: fresh random inputs, torch seed {_SEED} (set ALTO_TEST_SEED to replay)"


@pytest.fixture(autouse=True)
def _fresh_seed():
    import os

    torch.manual_seed(int(os.environ.get("ALTO_TEST_SEED", _SEED)))
