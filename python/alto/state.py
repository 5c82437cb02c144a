"""An adapter's whole state (what its future trajectory depends on): what a checkpoint stores, what
an adapter sent back to the queue keeps, and what moves when it migrates to another rank."""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from alto.model import LayerTensors


@dataclass
class AdapterState:
    """Weights, pending gradients, optimizer state, data position and dropout RNG of one adapter
    (migration sends it as one flat buffer of :meth:`tensors`)."""

    weights: dict[str, LayerTensors]  # layer path -> {tensor name: tensor}
    grads: list[torch.Tensor]  # pending accumulated gradients, in adapter_tensors' order
    optimizer: dict  # MultiAdamW.states(): step, exp_avg, exp_avg_sq
    data_position: int
    rng: torch.Tensor  # the adapter's dropout generator state (uint8)

    def tensors(self) -> list[torch.Tensor]:
        """All of it as tensors, in a fixed order (the scalars as 1-element int64 tensors)."""
        weights = [t for layer in self.weights.values() for t in layer.values()]
        scalars = torch.tensor([self.optimizer["step"], self.data_position], dtype=torch.int64)
        return weights + self.grads + self.optimizer["exp_avg"] + self.optimizer["exp_avg_sq"] + [scalars, self.rng]

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> "AdapterState":
        """The same structure holding `tensors` (laid out as :meth:`tensors` returns them)."""
        it = iter(tensors)
        weights = {p: {name: next(it) for name in layer} for p, layer in self.weights.items()}
        grads = [next(it) for _ in self.grads]
        exp_avg = [next(it) for _ in self.optimizer["exp_avg"]]
        exp_avg_sq = [next(it) for _ in self.optimizer["exp_avg_sq"]]
        step, position = next(it).tolist()
        return AdapterState(weights, grads, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq},
                            position, next(it))


STAGING_BYTES = 1 << 28  # the pinned buffer a copy to host memory goes through: 256 MiB at most


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A copy of a CUDA tensor in (pageable) host memory, through a pinned staging buffer that the
    caching host allocator keeps for the next copy. Measured on the H200 (140 MB): the driver's copy
    straight into fresh pageable memory, tensor.to("cpu"), 1.2 GB/s; staged, 10 GB/s (the copy out of
    the staging buffer is the host's own memcpy). The caller's stream does the copy; the host waits."""
    out = torch.empty(t.shape, dtype=t.dtype)
    src, dst = t.detach().reshape(-1), out.view(-1)
    step = max(1, STAGING_BYTES // t.element_size())
    staging = torch.empty(min(step, src.numel()), dtype=t.dtype, pin_memory=True)
    stream = torch.cuda.current_stream(t.device)
    for start in range(0, src.numel(), step):
        n = min(step, src.numel() - start)
        staging[:n].copy_(src[start : start + n], non_blocking=True)
        stream.synchronize()
        dst[start : start + n].copy_(staging[:n])
    return out


def _moved(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Copies of tensors on `device`, moved as one buffer per dtype, coming out as views of it."""
    moved = list(tensors)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[t.device, t.dtype].append(i)
    for idx in groups.values():
        # torch's flatten/unflatten (DDP's bucket helpers): their loop over tensors runs in C++
        # (measured twice as fast as torch.cat + split + view from Python on 32k small tensors)
        group = [tensors[i] for i in idx]
        flat = torch._utils._flatten_dense_tensors(group)
        if len(group) == 1:  # flattening one tensor returns a view of it: copy
            flat = flat.clone()
        moved_flat = to_host(flat) if flat.is_cuda and device.type == "cpu" else flat.to(device)
        for i, t in zip(idx, torch._utils._unflatten_dense_tensors(moved_flat, group)):
            moved[i] = t
    return moved


def move_states(states: Mapping[str, AdapterState], device: torch.device | str) -> dict[str, AdapterState]:
    """Copies of adapter states on `device` (step count, data position and generator state stay on
    the CPU, where torch keeps generator states). Each adapter's tensors travel as one buffer per
    dtype and come out as views of it: one gather and one transfer per adapter instead of one per
    tensor (an adapter on 1B widths has ~500 tensors; see Trainer.retire); per adapter, so the
    gather never holds more than one adapter's copy on the GPU, and a state freed later frees all
    of its memory."""
    device = torch.device(device)
    out = {}
    for aid, state in states.items():
        tensors = state.tensors()
        out[aid] = state.with_tensors(_moved(tensors[:-2], device) + [t.clone() for t in tensors[-2:]])
    return out


def copy_weights(weights: dict[str, LayerTensors], device: torch.device | str) -> dict[str, LayerTensors]:
    """A copy of one adapter's weights on `device`, moved as one buffer (a best checkpoint)."""
    it = iter(_moved([t.detach() for layer in weights.values() for t in layer.values()], torch.device(device)))
    return {path: {name: next(it) for name in layer} for path, layer in weights.items()}


class HostCopies:
    """Host copies of adapters' weights (a best checkpoint at each evaluation) brought over by one
    background thread on a CUDA stream of its own: the run's stream gathers a copy into one buffer
    on the GPU (fast), the thread moves it to host memory while the steps go on. Copied in line,
    32 configurations on 1B widths with an evaluation every 4 steps spent 16 of 87 s on the H200
    there. A copy's future gives the weights; on the CPU it is made at once. The run waits for them
    before its next step (SweepRun.settle_best): what a step's memory holds never depends on how far
    they got."""

    def __init__(self):
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="alto-host-copy")
        self._stream: torch.cuda.Stream | None = None

    def weights(self, weights: dict[str, LayerTensors]) -> Future:
        keys = [(path, name) for path, layer in weights.items() for name in layer]
        tensors = [weights[path][name].detach() for path, name in keys]
        if not tensors or tensors[0].device.type != "cuda" or len({t.dtype for t in tensors}) > 1:
            done: Future = Future()
            done.set_result(copy_weights(weights, "cpu"))
            return done
        flat = torch.cat([t.flatten() for t in tensors])  # a copy on the run's stream: later steps change the weights
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(flat.device))
        return self._thread.submit(self._to_host, flat, ready, keys, [t.shape for t in tensors])

    def close(self) -> None:
        """Ends the copy thread once the run has taken every copy (its end): a process leaves at once
        only when no thread of its own is left (alto.cli.entry)."""
        self._thread.shutdown(wait=True)

    def _to_host(self, flat: torch.Tensor, ready: torch.cuda.Event, keys: list[tuple[str, str]],
                 shapes: list[torch.Size]) -> dict[str, LayerTensors]:
        if self._stream is None:
            self._stream = torch.cuda.Stream(flat.device)
        with torch.cuda.device(flat.device), torch.cuda.stream(self._stream):  # a thread's device is its own
            self._stream.wait_event(ready)
            host = to_host(flat)  # waits for the copy (in this thread only); flat is freed after it
        out: dict[str, LayerTensors] = {}
        for (path, name), shape, part in zip(keys, shapes, host.split([math.prod(s) for s in shapes])):
            out.setdefault(path, {})[name] = part.view(shape)
        return out
