"""Which adapters each rank's steps co-locate, and where every adapter of the run is: owner (a
running adapter -> the rank training it), holder (a queued adapter whose saved state a rank
holds: sent back after an out-of-memory step), the order they were admitted (the latest go back
first); what bounds a rank's set (the memory model of alto.admission, or max_running slots) and
the samples reclaim "grow" refills to. Rank 0 decides (alto.decisions), every rank applies the
decisions to its trainer here: stops, admissions, growth, migrations; an out-of-memory step's
split; a resumed run's running adapters placed anew. The same on every rank, kept so by the
ranks' reports (merge).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from alto.admission import Admission
from alto.decisions import Decisions, decide
from alto.monitor import Decision
from alto.parallel import Group
from alto.registry import Adapter, Registry, Status
from alto.sched.placement import place
from alto.state import AdapterState, move_states
from alto.train import Trainer


class Colocation:
    """costs(adapters) -> each one's work per step (placement evens it out across ranks)."""

    def __init__(self, group: Group, registry: Registry, trainer: Trainer, device: torch.device,
                 costs: Callable[[list[Adapter]], dict[str, float]], admission: Admission | None, slots: int | None):
        self.group, self.registry, self.trainer, self.device, self.costs = group, registry, trainer, device, costs
        self.admission = admission  # max_running: auto admits by memory (every rank fits one; rank 0 decides)
        self.slots = slots  # adapters per rank (lowered after an out-of-memory step)
        self.owner: dict[str, int] = {}  # running adapter -> the rank training it (same on every rank)
        self.holder: dict[str, int] = {}  # queued adapter whose state a rank holds (sent back after OOM)
        self.admitted: dict[str, None] = {}  # adapters in the order they were last admitted
        self.samples_budget = 0  # most samples per step seen: what reclaim "grow" refills to

    def decide(self, stops: list[Decision], reclaim: str, proposals: list[Adapter]) -> Decisions:
        """Rank 0's decisions after the monitor's stops, the searchers' proposals queued (alto.decisions.decide)."""
        return decide(self.registry, stops, self.owner, self.holder, world=self.group.world, admission=self.admission,
                      slots=self.slots, reclaim=reclaim, samples_budget=self.samples_budget, costs=self.costs,
                      proposals=proposals)

    def apply(self, decisions: Decisions, say: Callable[[str], None], weight_copies: Mapping[str, dict] | None = None) -> None:
        """The decisions on this rank: its stopped adapters retired together (weight_copies: host copies of
        their weights as they are, where made already: Trainer.copy_out), admissions put in at once
        (each layer re-packed once), migrations sent and received."""
        rank, t = self.group.rank, self.trainer
        stopped = []
        for d in decisions.stops:
            a = self.registry[d.adapter]
            if self.owner.pop(a.id) == rank:
                stopped.append((a, Status.STOPPED_EARLY, d.reason))
            else:
                a.status, a.failure = Status.STOPPED_EARLY, d.reason
        if stopped:
            t.retire(stopped, weight_copies=weight_copies)
        for aid, n in decisions.growth.items():
            self.registry[aid].extra_batch += n
        admitted: list[Adapter] = []
        saved: dict[str, AdapterState] = {}
        for aid, r in decisions.admissions.items():
            a = self.registry[aid]
            self.owner[aid] = r
            self.holder.pop(aid, None)
            self.admitted.pop(aid, None)
            self.admitted[aid] = None
            if r == rank:
                admitted.append(a)
                if aid in t.retired:  # sent back to the queue after an out-of-memory step
                    saved[aid] = t.retired.pop(aid)
            else:
                a.status = Status.RUNNING
            say(f"  admit {aid} on rank {r}" if self.group.world > 1 else f"  admit {aid} into a freed slot")
        if admitted:
            t.admit(admitted, move_states(saved, self.device))
        for aid, src, dst in decisions.moves:
            a = self.registry[aid]
            if rank == src:
                self.group.send_state(t.release([aid])[aid], dst, self.device)
            elif rank == dst:
                t.admit([a])  # a fresh copy gives the shapes to receive into
                t.admit([a], {aid: self.group.recv_state(t.release([aid])[aid], src, self.device)})
            self.owner[aid] = dst
            say(f"  move {aid}: rank {src} -> rank {dst}")

    def out_of_memory(self, positions: int, params: int) -> tuple[int, int, int]:
        """This rank's step ran out of memory (and was undone): the most recently admitted half of
        its adapters goes back to the queue, states kept (a lone adapter fails: it cannot run
        smaller; those sent back lose any samples reclaim "grow" gave them). Returns the failed
        step's (token positions: the larger of the step's and the planned ones, so the memory
        model never admits that set again; its adapter parameters, `params`) and how many adapters
        it kept."""
        t = self.trainer
        order = list(self.admitted)
        mine = sorted(t.running(), key=lambda a: order.index(a.id))
        if self.admission is not None:
            positions = max(positions, self.admission.load(mine)[0])
        if len(mine) == 1:
            t.retire([(mine[0], Status.FAILED, f"out of memory alone, in a step of {positions} token positions")])
        back = mine[(len(mine) + 1) // 2:]  # none of a lone one
        for a in back:
            a.extra_batch = 0
        if back:
            t.retire([(a, Status.QUEUED, f"out of memory: a step of {len(mine)} adapters and {positions} token "
                                         "positions did not fit; back to the queue") for a in back])
        return positions, params, (len(mine) + 1) // 2 if len(mine) > 1 else 0

    def peaks(self, positions: int, params: int, measured: bool) -> tuple[float | None, float | None]:
        """A step's peak memory as the memory model predicted it and, on a GPU (measured: the step
        ran), as measured: the model is corrected to it, if higher."""
        predicted = peak = None
        if self.admission is not None:
            predicted = self.admission.peak.predict(positions, params)
        if self.device.type == "cuda" and measured:
            peak = float(torch.cuda.max_memory_allocated(self.device))
            if self.admission is not None:
                self.admission.observe(positions, params, peak)
        return predicted, peak

    def merge(self, reports: list[tuple[dict, tuple | None]]) -> tuple[dict[str, float], list[Adapter]]:
        """Every rank's report of a step (alto.sweep_run.SweepRun.report: its adapters' progress,
        and what out_of_memory answered if its step ran out of memory) applied to this rank's
        registry and placement: adapters sent back to the queue are held by the rank that sent
        them, the memory model corrected. Returns the step's losses (registry order) and the
        adapters an out-of-memory step sent back or failed."""
        losses, split = {}, []
        for rank, (part, oom) in enumerate(reports):
            for aid, (since, progress) in part.items():
                a = self.registry[aid]
                if self.owner.get(aid) != self.group.rank:  # the owner updated its copy itself
                    a.apply_progress(progress, since)
                if progress["losses"]:
                    losses[aid] = a.losses[-1]
                self._reported(a, rank)
                if oom is not None and a.status != Status.RUNNING:
                    split.append(a)
            if oom is not None:
                self._after_out_of_memory(oom)
        return {a.id: losses[a.id] for a in self.registry if a.id in losses}, split

    def _reported(self, a: Adapter, rank: int) -> None:
        """A rank reported the adapter's progress: sent back to the queue, that rank holds it;
        no longer running, no rank trains it."""
        if a.status == Status.QUEUED:
            self.holder[a.id] = rank
        if a.status != Status.RUNNING:
            self.owner.pop(a.id)

    def _after_out_of_memory(self, oom: tuple[int, int, int]) -> None:
        """A rank's step ran out of memory (out_of_memory's answer): the memory model never admits
        that set again, or the slots shrink to what the rank kept."""
        positions, params, kept = oom
        self.samples_budget = 0  # reclaim "grow" refills to what runs after the split
        if self.admission is not None:
            self.admission.out_of_memory(positions, params)
        elif kept:
            self.slots = min(self.slots, kept)

    def gathered(self) -> None:
        """Every queued adapter's state is now on rank 0 (a checkpoint gathered them)."""
        self.holder = dict.fromkeys(self.holder, 0)

    def resume(self, running: list[Adapter], held: list[str], states: dict[str, AdapterState]) -> None:
        """A checkpoint's running adapters placed anew on this run's ranks (this rank's put in with
        their states), its queued ones with a state held by rank 0."""
        self.holder.update(dict.fromkeys(held, 0))
        self.admitted.update(dict.fromkeys(a.id for a in running))
        self.owner = place([a.id for a in running], self.costs(running), [0.0] * self.group.world)
        mine = [a for a in running if self.owner[a.id] == self.group.rank]
        self.trainer.admit(mine, move_states({a.id: states[a.id] for a in mine}, self.device))
