"""Rank-local adapter parallelism: one sweep over several GPUs (or CPU processes).

The frozen base model is replicated on every rank; every adapter lives WHOLE on exactly one rank
(weights, optimizer state, data stream, dropout RNG) and is trained there by that rank's own
co-located steps. Adapter gradients are never all-reduced: the only collectives of a step are a
small gather of every adapter's loss (the monitor needs all of them) and a broadcast of rank 0's
decisions (stops, admissions, migrations). An adapter that migrates travels as one flat buffer
through the compiled extension (alto_ext.send_tensors / recv_tensors: NCCL for CUDA tensors).

Placement balances the work per step: an adapter's cost is the FLOPs its micro-batch adds to a
co-located step (alto.sched.estimate.adapter_step_flops), and ranks run in lockstep, so the step
time is the busiest rank's.
"""
from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from multiprocessing import connection
from typing import Any

import torch

import alto_ext
from alto.registry import Adapter
from alto.sched.estimate import ModelShape, adapter_step_flops
from alto.train import AdapterState


def adapter_cost(adapter: Adapter, seq_len: int, shape: ModelShape) -> float:
    """FLOPs one micro-step of this adapter adds to its rank's step (with any micro-batch it grew)."""
    config = dataclasses.replace(adapter.config, micro_batch_size=adapter.micro_batch_size)
    return adapter_step_flops(config, seq_len, shape)


def rank_loads(owner: dict[str, int], costs: dict[str, float], world: int) -> list[float]:
    loads = [0.0] * world
    for aid, rank in owner.items():
        loads[rank] += costs[aid]
    return loads


def place(new: Iterable[str], costs: dict[str, float], loads: list[float]) -> dict[str, int]:
    """Longest-processing-time-first: each new adapter, costliest first, onto the least-loaded rank
    (ties: the lowest rank). `loads` is updated in place."""
    owner = {}
    for aid in sorted(new, key=lambda a: -costs[a]):  # stable: equal costs keep their order
        rank = min(range(len(loads)), key=lambda r: loads[r])
        owner[aid] = rank
        loads[rank] += costs[aid]
    return owner


def rebalance(owner: dict[str, int], costs: dict[str, float], world: int,
              min_gain: float = 0.05) -> list[tuple[str, int, int]]:
    """Migrations (adapter, from rank, to rank) that lower the busiest rank's load: repeatedly move
    the adapter from the busiest to the idlest rank that best evens the pair, while that cuts the
    pair's larger load by more than min_gain of it (small gains are not worth a transfer)."""
    owner, moves = dict(owner), []
    while True:
        loads = rank_loads(owner, costs, world)
        hi = max(range(world), key=lambda r: loads[r])
        lo = min(range(world), key=lambda r: loads[r])
        best, best_peak = None, loads[hi] * (1.0 - min_gain)
        for aid in (a for a, r in owner.items() if r == hi):
            peak = max(loads[hi] - costs[aid], loads[lo] + costs[aid])
            if peak < best_peak:
                best, best_peak = aid, peak
        if best is None:
            return moves
        owner[best] = lo
        moves.append((best, hi, lo))


class Group:
    """The ranks of a run. The default (one rank, no torch.distributed) makes every collective a
    no-op, so single-GPU runs take the same code path."""

    def __init__(self, rank: int = 0, world: int = 1, objects=None):
        self.rank, self.world, self._objects = rank, world, objects

    @classmethod
    def from_env(cls, device_type: str) -> "Group":
        """Joins the ranks torchrun / alto tune --nproc started (RANK, WORLD_SIZE, MASTER_ADDR,
        MASTER_PORT in the environment): NCCL for CUDA tensors, gloo for CPU tensors and for the
        pickled metric/decision messages (small; they never touch the GPU)."""
        import torch.distributed as dist

        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo")
        objects = dist.new_group(backend="gloo")
        return cls(dist.get_rank(), dist.get_world_size(), objects)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self._objects)
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's object, on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.is_leader else None
        dist.gather_object(obj, out, dst=0, group=self._objects)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's object on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._objects)
        return box[0]

    def send_state(self, state: AdapterState, dst: int, device: torch.device) -> None:
        alto_ext.send_tensors([t.to(device) for t in state.tensors()], dst)

    def recv_state(self, template: AdapterState, src: int, device: torch.device) -> AdapterState:
        """Receives into buffers shaped like `template` (the adapter's freshly initialized state)."""
        outs = [torch.empty_like(t, device=device) for t in template.tensors()]
        alto_ext.recv_tensors(outs, src)
        return template.with_tensors(outs).to(device)

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn: Callable[..., Any], nproc: int, args: Sequence[Any] = ()) -> list[Any]:
    """Runs fn(*args) in nproc processes on this host as ranks 0..nproc-1 (what torchrun would
    set up); returns every rank's result, in rank order. A rank that raises stops the others."""
    import torch.multiprocessing as mp

    if nproc < 1:
        raise ValueError(f"--nproc={nproc} must be >= 1")
    if nproc == 1:
        return [fn(*args)]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, args, rank, nproc, port, results)) for rank in range(nproc)]
    for p in procs:
        p.start()
    alive = list(procs)
    while alive:
        ended = connection.wait([p.sentinel for p in alive])
        for p in [p for p in alive if p.sentinel in ended]:
            p.join()
            alive.remove(p)
            if p.exitcode != 0:  # the others may wait on the dead rank forever
                for q in alive:
                    q.kill()
                raise RuntimeError(f"rank {procs.index(p)} exited with code {p.exitcode}; its error is above")
    by_rank = dict(results.get() for _ in procs)
    return [by_rank[r] for r in range(nproc)]


def _rank_main(fn, args, rank: int, world: int, port: int, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    results.put((rank, fn(*args)))
