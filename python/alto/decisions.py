"""What rank 0 decides after a step, and every rank applies (SweepRun.apply): the monitor's stops,
capacity reclaim (queued adapters admitted where the memory model or the free slots allow, or the
survivors' micro-batches grown back), placement on ranks and migrations between them.

decide() is a function of the registry, the placement (which rank trains or holds each adapter)
and the admission state, and nothing else: no model, no device; tests/test_decisions.py drives it
alone. A new kind of decision is a field of Decisions, set here, applied in SweepRun.apply. The
searchers' proposals (alto.searchers) come in as queued adapters not yet registered.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from alto.admission import Admission, admission_order
from alto.monitor import Decision
from alto.registry import Adapter, Registry, Status
from alto.sched.placement import place, rank_loads, rebalance


@dataclass
class Decisions:
    """What rank 0 decides after a step, and every rank applies."""

    stops: list[Decision] = field(default_factory=list)  # the monitor's
    admissions: dict[str, int] = field(default_factory=dict)  # queued adapter -> the rank it starts on
    growth: dict[str, int] = field(default_factory=dict)  # running adapter -> samples added to its micro-batch
    moves: list[tuple[str, int, int]] = field(default_factory=list)  # (adapter, from rank, to rank)
    halt: bool = False  # stop after this step at a checkpoint (asked by whoever runs the sweep: alto.cluster)
    # the searchers' new configurations (alto.searchers), queued on every rank before the rest applies
    proposals: list[Adapter] = field(default_factory=list)


def decide(registry: Registry, stops: list[Decision], owner: Mapping[str, int], holder: Mapping[str, int], *,
           world: int, admission: Admission | None, slots: int | None, reclaim: str, samples_budget: int,
           costs: Callable[[list[Adapter]], dict[str, float]], proposals: Sequence[Adapter] = ()) -> Decisions:
    """The decisions after the monitor's `stops`: capacity reclaim (queued adapters, largest
    micro-batch first, admitted where the memory model says they fit (admission), or else into
    free slots (`slots` per rank) on the least-loaded ranks; with reclaim "grow" and nobody queued, the
    survivors' micro-batches grow back to `samples_budget`, the most samples per step seen, as far
    as they fit), then migrations that even out the ranks' work (costs: each adapter's per step).
    owner: running adapter -> its rank; holder: queued adapter -> the rank holding its state.
    proposals: the searchers' new adapters (not yet in the registry), queued with the rest."""
    stopped = {d.adapter for d in stops}
    running = [a for a in registry.with_status(Status.RUNNING) if a.id not in stopped]
    queued = admission_order([*registry.with_status(Status.QUEUED), *proposals])
    owner = {aid: r for aid, r in owner.items() if aid not in stopped}
    placed: dict[str, int] | None = None
    if admission is not None:
        by_rank: dict[int, list[Adapter]] = {r: [] for r in range(world)}
        for a in running:
            by_rank[owner[a.id]].append(a)
        placed = admission.choose(by_rank, queued, dict(holder))
        admit = [a for a in queued if a.id in placed]
    else:
        admit = queued[: max(0, slots * world - len(running))]
    growth: dict[str, int] = {}
    if reclaim == "grow" and running + admit and len(admit) == len(queued):
        members = running + admit
        for i in range(max(0, samples_budget - sum(a.micro_batch_size for a in members))):
            aid = members[i % len(members)].id
            growth[aid] = growth.get(aid, 0) + 1
        if admission is not None and growth and not admission.fits(members, growth):
            growth = {}  # the grown set would not fit: the samples stay freed
    if world == 1:  # nothing to place: no cost estimates on the single-rank step path
        return Decisions(stops, {a.id: 0 for a in admit}, growth, proposals=list(proposals))
    cost = costs(running + admit)
    by_id = {a.id: a for a in running + admit}
    for aid, n in growth.items():  # grown micro-batches cost more
        cost[aid] *= (by_id[aid].micro_batch_size + n) / by_id[aid].micro_batch_size
    if placed is None:
        pinned = {a.id: holder[a.id] for a in admit if a.id in holder}
        placed = {**place([a.id for a in admit if a.id not in pinned], cost, rank_loads(owner, cost, world)), **pinned}
    return Decisions(stops, placed, growth, rebalance({**owner, **placed}, cost, world), proposals=list(proposals))
