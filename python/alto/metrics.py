"""Task metrics by name: what a held-out greedy completion is worth against its reference. Part of
the sweep's spec (alto.tasks checks a metric when it parses the sweep), so it imports no torch.
A new metric is one function added to METRICS; a user's own is given as module:function."""
from __future__ import annotations

import importlib
from collections.abc import Callable

Metric = Callable[[str, str], float]  # (prediction, reference) -> score


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


METRICS: dict[str, Metric] = {"exact_match": exact_match}


def metric_function(spec: str) -> Metric:
    """A metric by name (METRICS) or as module:function; ValueError if it cannot be had."""
    if spec in METRICS:
        return METRICS[spec]
    module, _, name = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not module or not name:
        raise ValueError(f"{spec!r} must be one of {', '.join(METRICS)} or module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {spec!r} ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ValueError(f"{spec!r} is not a function")
    return fn
