import json
import random

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


# Shared by the test modules (`from conftest import ...`: pytest puts tests/ on the path).
TINY_LLAMA = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64}
WORDS = ["alpha", "beta", "gamma", "delta", "lora", "rank", "adapter", "token"]


def write_word_records(path, max_words: int, n: int = 40, seed: int = 3):
    """n JSONL records {"text": 2..max_words random words} at path (the same for a seed)."""
    rng = random.Random(seed)
    path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, max_words + 1)))})
                              for _ in range(n)))
    return path


@pytest.fixture
def sweep_yaml(tmp_path):
    """write(out="run", **top_level_keys) -> the path of a small valid sweep file in tmp_path (a tiny
    random Llama on 40 JSONL records, 2x2 grid, CPU, output tmp_path/out); keys given replace the
    default ones whole."""
    def write(out: str = "run", **extra):
        data = write_word_records(tmp_path / "data.jsonl", max_words=5)
        doc = {"name": "t", "model": {"random_llama": TINY_LLAMA}, "device": "cpu", "checkpoint_every": 2,
               "output": str(tmp_path / out),
               "data": {"source": "jsonl", "path": str(data), "max_length": 24, "eval_fraction": 0.2},
               "defaults": {"micro_batch_size": 2, "max_steps": 3, "target_modules": ["q_proj", "v_proj"]},
               "grid": {"rank": [2, 4], "lr": [1e-3, 3e-3]}, **extra}
        path = tmp_path / f"{out}.yaml"
        path.write_text(json.dumps(doc))  # JSON is YAML
        return path
    return write
