"""Evaluation, in one home: each task's held-out sequences scored by adapters in the model,
co-located (at the task's evaluation points, as an adapter finishes, and at the end for adapters
whose last weights were not scored), every adapter's best weights kept in host memory for tasks
that export their best, and the end's outcomes: the weights each adapter exports, their held-out
loss and the task's metric of greedy completions (alto.generate).

A forward of an evaluation holds several adapters' sequences, at most a few times the token
positions the largest training step ran (Evaluation.observe_step, forward_only_factor): it keeps no
activations for a backward, so it fits where the steps fit. How sequences fall into passes (the
adapters' order, the step shapes) sets the float sums: a resumed run restores the shapes from its
checkpoint.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future

import torch

from alto import data as data_mod
from alto.base import Base
from alto.generate import greedy_completions
from alto.metrics import metric_function
from alto.model import LayerTensors, MultiLoraModel
from alto.objectives import SFT, Objective
from alto.parallel import idle_pass
from alto.registry import Adapter, AdapterConfig, Registry, Status
from alto.results import Outcome
from alto.state import AdapterState, HostCopies
from alto.tasks import Task
from alto.step import colocated_losses

Weights = dict[str, LayerTensors]  # an adapter's tensors by layer path (MultiLoraModel.adapter_weights)


@contextlib.contextmanager
def evaluating(model: MultiLoraModel) -> Iterator[None]:
    """No gradients and no dropout inside; the model trains again after."""
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train()


@contextlib.contextmanager
def loaded(model: MultiLoraModel, adapters: Mapping[str, tuple[AdapterConfig, Weights]]) -> Iterator[None]:
    """Adapters no longer (or not yet) in the model put in with these weights, taken out after."""
    model.add_adapters({aid: cfg for aid, (cfg, _) in adapters.items()}, {aid: w for aid, (_, w) in adapters.items()})
    try:
        yield
    finally:
        model.remove_adapters(list(adapters))


def held_out_means(model: MultiLoraModel, batches: Mapping[str, Sequence[Sequence[int]]], pad_id: int,
                    device: torch.device, max_positions: int,
                    lockstep: Callable[[int], int] | None = None, packed: bool = True,
                    objective: Objective = SFT()) -> list[list[float]]:
    """Each adapter's mean loss (its objective's) over its own held-out samples (batches' order),
    then each of the objective's metrics ([1 + len(objective.metrics)] lists in batches' order),
    co-located: every forward holds several adapters' samples, whole, at most max_positions token
    positions (and at least one sample), packed as training's steps are (or as padded rows). lockstep(forwards this needs) ->
    forwards to run: a sharded base's ranks run as many as the busiest, idle passes making up the
    rest (SweepRun.lockstep)."""
    k = objective.per_sample
    work = [(aid, seqs[i:i + k]) for aid, seqs in batches.items() for i in range(0, len(seqs), k)]
    chunks: list[dict[str, list[Sequence[int]]]] = []
    start = 0
    while start < len(work):
        end, tokens, longest, rows = start, 0, 0, 0
        while end < len(work):
            lengths = [len(s) for s in work[end][1]]
            # the chunk's token positions with this sample (padded: every row as long as the longest)
            with_it = tokens + sum(lengths) if packed else (rows + len(lengths)) * max(longest, *lengths)
            if end > start and with_it > max_positions:
                break
            tokens, longest, rows, end = tokens + sum(lengths), max(longest, *lengths), rows + len(lengths), end + 1
        chunks.append({})
        for aid, sample in work[start:end]:
            chunks[-1].setdefault(aid, []).extend(sample)
        start = end
    own = len(chunks)
    passes = lockstep(own) if lockstep else own  # agreed before any pass
    # summed on the device and read once, at the end
    sums = torch.zeros(2 + len(objective.metrics), len(batches), dtype=torch.float64, device=device)
    index = {aid: i for i, aid in enumerate(batches)}
    with evaluating(model):
        for chunk in chunks:
            part = colocated_losses(model, chunk, pad_id, device, training=False, packed=packed,
                                    objective=objective).double()
            sums.index_add_(1, torch.tensor([index[aid] for aid in chunk], device=device), part)
        for _ in range(passes - own):
            idle_pass(model.model, backward=False)
    return (torch.cat([sums[:1], sums[2:]]) / sums[1].clamp(min=1.0)).tolist()  # the one wait


def forward_only_factor(layers: int) -> int:
    """How many times a training step's token positions an evaluation's forward may hold: it keeps
    no activations for a backward (a layer's at a time; decoding adds a KV cache of a few KB per
    position and layer), where a step keeps every layer's until its backward, so a model of at
    least 4 x factor layers holds a quarter of the step's activations at most. Fewer, fuller
    passes: each one is host time on a GPU (SmolLM2's held-out passes and decoding steps are
    host-bound there), and the default sweep's greedy decoding ran 4 batches of 12 steps on a
    2-core CPU where 1 does."""
    return max(1, min(4, layers // 4))


def last_evaluated(a: Adapter) -> float | None:
    """The held-out loss of the adapter's last weights, if they were evaluated: as it finished
    (SweepRun.report), or at the evaluation point where the monitor stopped it."""
    if a.last_loss is not None:
        return a.last_loss
    if a.status != Status.FAILED and a.eval_steps and a.eval_steps[-1] == a.micro_step:
        return a.eval_losses[-1]
    return None


class Evaluation:
    """One run's evaluations on one rank (see the module docstring). lockstep: SweepRun.lockstep."""

    def __init__(self, tasks: Mapping[str, Task], eval_seqs: Mapping[str, list[list[int]]], model: MultiLoraModel,
                 base: Base, device: torch.device, lockstep: Callable[[int], int], packed: bool = True,
                 objective: Objective = SFT()):
        self.tasks, self.eval_seqs, self.model, self.base = tasks, eval_seqs, model, base
        self.device, self.lockstep, self.packed, self.objective = device, lockstep, packed, objective
        self.largest_step = 0  # most token positions a step ran: what an evaluation's forward may hold
        self.most_colocated = 0  # most adapters a step ran: how many the end's evaluation puts in together
        # adapter -> (step, weights on the CPU) of its best held-out loss, for tasks exporting best
        # (on the rank that evaluated it; collected on rank 0 at checkpoints)
        self.best_weights: dict[str, tuple[int, Weights | Future]] = {}  # a future: its copy still under way
        self.host_copies = HostCopies()

    def observe_step(self, positions: int, adapters: int) -> None:
        """A training step ran: its token positions and adapters shape later evaluations."""
        self.largest_step = max(self.largest_step, positions)
        self.most_colocated = max(self.most_colocated, adapters)

    def due(self, task: str, micro_step: int) -> bool:
        """Whether the run's micro-step ends with the task's held-out losses."""
        every = self.tasks[task].eval.every
        return every is not None and micro_step % every == 0 and bool(self.eval_seqs[task])

    def held_out(self, task: str) -> list[list[int]]:
        """The held-out sequences a task's evaluations read: those of its first eval.samples samples."""
        return self.eval_seqs[task][: self.tasks[task].eval.samples * self.objective.per_sample]

    def positions(self) -> int:
        """Token positions an evaluation's forward may hold: forward_only_factor times as many as the
        largest training step ran (as many where the model's logits are computed whole: a soft-capped
        or scaled head's, whose bytes do not shrink with the layers), at least one sequence of each task."""
        layers = self.model.model.config.num_hidden_layers
        factor = forward_only_factor(layers) if self.model.plain_head is not None else 1
        return max(factor * self.largest_step, *(t.data["max_length"] for t in self.tasks.values()))

    def means(self, adapters: list[Adapter]) -> list[list[float]]:
        """Held-out losses of adapters in the model, each on its task's sequences, co-located, then
        each of the objective's held-out metrics (held_out_means)."""
        return held_out_means(self.model, {a.id: self.held_out(a.task) for a in adapters}, self.base.pad_id,
                              self.device, self.positions(), self.lockstep, self.packed, self.objective)

    def losses(self, adapters: list[Adapter]) -> list[float]:
        return self.means(adapters)[0]

    def keep_if_best(self, a: Adapter, loss: float, weights: Weights, live: bool = True) -> None:
        """Records a held-out loss of the adapter's weights at its current step; the best so far is
        kept where its task exports best: the weights in the model (live) copied to host memory in
        the background (HostCopies), a host copy nothing changes (a retired adapter's) as it is."""
        if math.isfinite(loss) and (a.best is None or loss < a.best[1]):
            a.best = (a.step, loss)
            if self.tasks[a.task].export == "best":
                self.best_weights[a.id] = (a.step, self.host_copies.weights(weights) if live else weights)

    def record(self, adapters: list[Adapter], losses: list[float], finished: set[str],
               retired: Mapping[str, AdapterState]) -> None:
        """A step's held-out losses (losses(adapters)): of those it finished, their last loss,
        their best kept from their retired host copy; of the others, an evaluation point's, their
        best copied from the model."""
        for a, loss in zip(adapters, losses):
            if a.id in finished:
                a.last_loss = loss
                self.keep_if_best(a, loss, retired[a.id].weights, live=False)
            else:
                a.record_eval(loss)
                self.keep_if_best(a, loss, self.model.adapter_weights(a.id, views=True))

    def copies_now(self, adapters: Iterable[Adapter]) -> dict[str, Weights]:
        """Host copies of these adapters' weights as they are now: their best where it was taken at
        their present step (an adapter the monitor stops at the evaluation that made its best). At
        its first evaluation, rule alto stopped 24 of 32 SmolLM2 configurations whose best copies had
        just been made: retiring them copied the same weights again (0.7 s of the H100's host time)."""
        out = {}
        for a in adapters:
            step, weights = self.best_weights.get(a.id, (None, None))
            # a running adapter's weights change only as its step count grows (a failed one's may not)
            if step is not None and step == a.step and a.status == Status.RUNNING:
                if isinstance(weights, Future):
                    weights = weights.result()
                    self.best_weights[a.id] = (step, weights)
                out[a.id] = weights
        return out

    def settle_best(self) -> None:
        """Waits for the best weights' host copies under way."""
        for aid, (step, weights) in self.best_weights.items():
            if isinstance(weights, Future):
                self.best_weights[aid] = (step, weights.result())

    def settled_export(self, a: Adapter, status: Status, last: Weights) -> tuple[int, Weights | Future] | None:
        """What an adapter that ended with `status` will export, (its step, the weights or their host
        copy under way), where no later evaluation can change it (else None): its task exports its
        last weights (last), or the adapter has no best yet (its last weights will be its best or
        its export either way), or its last weights were evaluated (its best is its best)."""
        if status not in (Status.FINISHED, Status.STOPPED_EARLY):
            return None
        if self.tasks[a.task].export == "last" or a.best is None:
            return a.step, last
        if last_evaluated(a) is not None and a.id in self.best_weights:  # (rank 0 has it: alto.checkpoint)
            return self.best_weights[a.id]
        return None

    def outcomes(self, registry: Registry, last: Mapping[str, Weights], retired: Mapping[str, AdapterState]
                 ) -> tuple[dict[str, Outcome], list[list]]:
        """At the end (every adapter retired; last: each one's last weights, retired: those out of
        the model): each adapter's last weights evaluated on its task's held-out sequences
        (co-located, as many together as the run co-located; not again where they were: as it
        finished, or at the evaluation point the monitor stopped it), its best kept if better; the
        weights its task exports, and their greedy completions of the task's held-out prompts
        scored by the task's metric. Returns the outcomes and the end's rows of evals.csv (task,
        adapter, its step, weights, held-out loss, metric, value)."""
        group = max(1, self.most_colocated or 16)
        adapters = list(registry)
        # none for a failed adapter, or a task without held-out data; an adapter whose last weights
        # were evaluated keeps that loss: it finished (SweepRun.report), the monitor stopped it at an evaluation point
        last_loss = {a.id: last_evaluated(a) for a in adapters if last_evaluated(a) is not None}
        todo = [a for a in adapters if a.status != Status.FAILED and self.eval_seqs[a.task] and a.id not in last_loss]
        for i in range(0, len(todo), group):
            part = todo[i : i + group]
            with loaded(self.model, {a.id: (a.config, last[a.id]) for a in part}):
                for a, loss in zip(part, self.losses(part)):
                    last_loss[a.id] = loss
                    self.keep_if_best(a, loss, last[a.id], live=a.id not in retired)
        self.settle_best()
        out = {}
        for a in adapters:
            if self.tasks[a.task].export == "best" and a.id in self.best_weights:
                out[a.id] = Outcome(self.best_weights[a.id][1], "best", a.best[0], a.best[1])
            else:
                out[a.id] = Outcome(last[a.id], "last", a.step, last_loss.get(a.id, math.nan))
        scored = [a for a in adapters if self.tasks[a.task].eval.metric]
        for i in range(0, len(scored), group):
            part = scored[i : i + group]
            with loaded(self.model, {a.id: (a.config, out[a.id].weights) for a in part}):
                for aid, value in self.metric_values(part).items():
                    out[aid].metric = (self.tasks[registry[aid].task].eval.metric, value)
        rows = []  # the end's evaluations, and each metric beside the weights it scored
        for a in adapters:
            o = out[a.id]
            metric = [o.metric[0], f"{o.metric[1]:.6f}"] if o.metric else ["", ""]
            metric_of_last = o.export == "last" and a.id in last_loss
            if a.id in last_loss:
                rows.append([a.task, a.id, a.step, "last", f"{last_loss[a.id]:.6f}", *(metric if metric_of_last else ["", ""])])
            if o.metric and not metric_of_last:
                rows.append([a.task, a.id, o.step, o.export, f"{o.eval_loss:.6f}", *metric])
        return out, rows

    def metric_values(self, adapters: list[Adapter]) -> dict[str, float]:
        """Each adapter's task metric: one of its objective's held-out metrics (DPO's reward accuracy,
        say), or a metric of greedy completions (decoded co-located) averaged over its task's
        held-out prompts (sequences cut at max_length are left out: their reference is cut too)."""
        if self.objective.metrics:
            means = self.means(adapters)
            return {a.id: means[1 + self.objective.metrics.index(self.tasks[a.task].eval.metric)][i]
                    for i, a in enumerate(adapters)}
        tok = self.base.tokenizer
        pairs = {t: [pr for s in self.held_out(t) if len(s) < self.tasks[t].data["max_length"]
                     and (pr := data_mod.prompt_and_reply(s)) is not None] for t in {a.task for a in adapters}}
        stop = {*getattr(tok, "all_special_ids", ()), *([] if self.base.eos_id is None else [self.base.eos_id])}
        new_tokens = max(self.tasks[a.task].eval.max_new_tokens for a in adapters)
        with evaluating(self.model):
            done = greedy_completions(self.model, {a.id: [p for p, _ in pairs[a.task]] for a in adapters}, new_tokens,
                                      stop, self.base.pad_id, self.device, self.positions(), self.packed)
        values = {}
        for a in adapters:
            cfg = self.tasks[a.task].eval
            fn = metric_function(cfg.metric)
            scores = [fn(tok.decode(c[: cfg.max_new_tokens], skip_special_tokens=True),
                         tok.decode(r, skip_special_tokens=True)) for c, (_, r) in zip(done[a.id], pairs[a.task])]
            values[a.id] = sum(scores) / len(scores) if scores else math.nan
        return values
