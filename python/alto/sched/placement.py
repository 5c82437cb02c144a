"""Adapters onto the ranks of one run (rank-local adapter parallelism, alto.parallel): every adapter
lives whole on one rank, and ranks step in lockstep, so placement balances the work per step. An
adapter's cost is the FLOPs its micro-batch adds to a co-located step (estimate.adapter_step_flops).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from alto.registry import Adapter
from alto.sched.catalog import ModelShape
from alto.sched.estimate import adapter_step_flops


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
