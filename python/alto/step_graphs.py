"""A training step's forward and backward as a CUDA graph, replayed where the step repeats one seen
before: the same adapters, sequence lengths (or bucket: alto.step_buckets), number of targets and
packs (alto.train).

Why: a step of few tokens waits for the host, which launches its kernels one by one from Python
(bench_step, one adapter at Llama-3-8B widths, 4 layers, on the H100: the frozen base's eager step
took 11.4 ms, 11.3 of them the host's; ALTO's 22.2 ms); a replay launches them all in one call.
Why not torch.compile's "reduce-overhead": it compiles each new shape (minutes of a sweep's wall),
and the alto ops build their outputs in place (alto_ext.grouped_terms: dynamo traces their gradients as
zeros). Here the step's own eager code is recorded as it runs.

Only steps the host holds up are captured. An unpadded step is timed the first time it is seen (host
time against GPU time, by CUDA events read later, without waiting); if the GPU waited, the second
time it runs on a side stream (its results, and the warm-up torch.cuda asks for), then is recorded.
Small steps are padded to buckets, their sequences whole (StepGraphs.buckets; BUCKETS, on by
default), so that the layouts of variable-length data repeat; such a step is the host's by its size:
captured the first time it is seen, without an eager run once the side stream is warm (recorded, then replayed):
early exit's retirements drop the graphs every few steps (SmolLM2's widths, H100: its train phase 4.2 -> 2.9-3.2 s).
A replay copies the new step's inputs (token ids, labels, target positions, gradient-accumulation weights)
into the graph's and returns fresh copies of its losses and gradients. All else it reads was sent to the
device before the capture (alto_ext.to_device refuses host data during one) and is a function of the key,
but a bucketed step's token ranges, written over the captured plan's (StepPlan.refresh). Padded steps'
graphs share one memory pool (a replay's results are copied out before the next runs), else each has its
own. At most CAPACITY graphs, dropped when the packs change (an adapter admitted or retired) and on out of
memory. Admission's memory model does not count them: a step out of memory while they are held, or padded,
runs again without them (alto.train) before its size is counted as too large, and none is captured until
the adapters change. Not graphed: dropout (LoRA's draws from each adapter's own generator; the base's and
its attention's), objectives with references, shared prefixes, several ranks, the CPU, and sync checks
(alto_ext.set_sync_checks). A capture that fails (an op waits for the GPU) leaves that step eager, warned.
"""
from __future__ import annotations

import os
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

import alto_ext
from alto import fused_layers, projection_stacks
from alto_ext import grouped_terms, one_adapter
from alto.model import MultiLoraModel
from alto.sched.catalog import ModelShape
from alto.step import Pass

# On (ALTO_STEP_GRAPHS=0: every step eager) since its tests, the suite and bench_step ran so (RESULTS.md, 2026-12-06).
ENABLED = os.environ.get("ALTO_STEP_GRAPHS", "1") != "0"
# Small steps padded to buckets (ALTO_STEP_BUCKETS=0: never): on since a SmolLM2-widths sweep's train phase fell from
# 9.2 to 5.3 s on an H100 (bench/RESULTS.md, 2026-12-07).
BUCKETS = os.environ.get("ALTO_STEP_BUCKETS", "1") != "0"
# A step is small (padded to its bucket) up to this many token positions x weights a token multiplies
# through per decoder layer: there the GPU's work per layer (~2 ms at 700 TFLOP/s) is below the host's launches
# (~5-6 ms a layer eager). Measured (bench/RESULTS.md, 2026-12-06): SmolLM2's widths (4.5M a layer) waited for the
# host at 16k tokens (7e10), bench_step's 4 layers of Llama-3-8B's widths (350M a layer with the lm_head's share)
# at 512 (1.8e11) and 4k tokens (1.4e12, by 4%); a 32-adapter step of Llama-3.2-1B's (77M x ~90k tokens: 7e12) is
# the GPU's. By size, not by timing: see StepGraphs.buckets.
SMALL_STEP = 4e11
# graphs kept: the layouts of a gradient-accumulation cycle, or a few buckets (sharing one pool where padded)
CAPACITY = 4 if BUCKETS else 2
HOST_BOUND = 0.8  # captured where the first run's host time was at least this share of its GPU time
MAX_SEEN = 4096  # first runs remembered (variable-length data rarely repeats: forgotten past this)

Compute = Callable[[Pass, torch.Tensor], torch.Tensor]


def layer_weights(model: MultiLoraModel) -> float:
    """Weights a token multiplies through per decoder layer (the lm_head's share included)."""
    shape = ModelShape.from_hf_config(model.model.config)
    return shape.matmul_params() / shape.layers


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    step: Pass  # the static inputs the graph reads
    weights: torch.Tensor  # the static gradient-accumulation weights
    losses: torch.Tensor  # the static per-adapter losses it writes
    grads: list[torch.Tensor | None]  # the static gradients it writes, one per pack

    def replay(self, step: Pass, weights: torch.Tensor, packs: Sequence[torch.Tensor]) -> torch.Tensor:
        """This step's losses, its gradients in the packs' .grad: the graph run on its inputs."""
        for name, value in step.inputs.items():
            if isinstance(value, torch.Tensor):
                self.step.inputs[name].copy_(value)
        self.step.labels.copy_(step.labels)
        if step.rows is not None:
            self.step.rows.copy_(step.rows)
        self.weights.copy_(weights)
        if step.plan.bucketed:  # the adapters' token ranges differ from the captured step's
            self.step.plan.refresh(step.plan)
        return self.launch(packs)

    def launch(self, packs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The graph run on the inputs it holds: the losses, the gradients in the packs' .grad."""
        self.graph.replay()
        for pack, grad in zip(packs, self.grads):
            pack.grad = None if grad is None else grad.clone()  # the next replay writes over the graph's
        return self.losses.clone()


@dataclass
class _FirstRun:
    start: torch.cuda.Event
    end: torch.cuda.Event
    host_s: float  # the host's time to launch it

    def done(self) -> bool:
        """Whether the GPU has reached its end (asked without waiting: a step ends in a read of its losses)."""
        return self.end.query()

    def host_bound(self) -> bool:
        """Whether the GPU waited for the host (done() first)."""
        return self.host_s * 1e3 >= HOST_BOUND * self.start.elapsed_time(self.end)


class StepGraphs:
    """The captured steps of one Trainer."""

    def __init__(self) -> None:
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.first_runs: dict[tuple, _FirstRun] = {}
        self.eager: set[tuple] = set()  # keys whose capture failed or that the GPU did not wait for
        self.packs_key: list | None = None
        self.held_off = False  # no capture until the packs change (memory ran out while graphs were held)
        self.stream: torch.cuda.Stream | None = None
        self.pool: tuple | None = None  # the graphs' one memory pool (torch.cuda.graph_pool_handle)
        self.padded = False  # the step run was padded (alto.step_buckets)
        self.counts = Counter()  # runs of steps a graph may take (takes()): replayed, captured, eager

    @staticmethod
    def _model_takes(model: MultiLoraModel, reference: torch.Tensor | None) -> bool:
        return (ENABLED and not alto_ext.sync_checks()  # (a wait per op)
                and reference is None and not model.base_dropout
                and not getattr(model.model.config, "attention_dropout", 0.0)
                and not (dist.is_available() and dist.is_initialized()))

    @classmethod
    def takes(cls, model: MultiLoraModel, step: Pass, reference: torch.Tensor | None) -> bool:
        """Whether this step may be captured at all."""
        return (step.plan.device.type == "cuda" and cls._model_takes(model, reference) and not step.plan.any_dropout
                and "shared_prefixes" not in step.inputs)

    def buckets(self, model: MultiLoraModel, reference: torch.Tensor | None, batches: Mapping[str, Sequence],
                packs: Sequence[torch.Tensor]) -> bool:
        """Whether the next step, of these adapters' sequences, training these packs (track), is padded to its
        bucket, its sequences whole (alto.step.prepare_pass; self.padded once run): one a graph may take (no LoRA
        dropout: its masks are drawn per sequence) that is small (SMALL_STEP: the host's, so the pads' GPU work is
        not what it waits for); none after memory ran out until the adapters change (held_off). Fixed-length data
        too (its target rows may vary). By the step, not by timings: the padding moves the float sums' last bits,
        and a run's results (a resumed run's) must not depend on its host's speed (out of memory aside)."""
        self.padded = False  # (until run() is given the step: prepare_pass pads packed steps only)
        self.track(packs)
        lengths = [len(s) for sequences in batches.values() for s in sequences]
        return (BUCKETS and not self.held_off and self._model_takes(model, reference)
                and not any(model.configs[aid].dropout > 0 for aid in batches)
                and sum(lengths) * layer_weights(model) <= SMALL_STEP)

    def clear(self) -> None:
        """Drops every graph (their memory pool with them)."""
        self.graphs.clear()
        self.first_runs.clear()
        self.eager.clear()
        self.pool = None

    def track(self, packs: Sequence[torch.Tensor]) -> None:
        """The packs the next step trains: others (adapters came or went) drop the graphs and end a hold-off."""
        packs_key = [(id(p), p.data_ptr(), tuple(p.shape)) for p in packs]
        if packs_key != self.packs_key:
            self.clear()
            self.packs_key, self.held_off = packs_key, False

    def hold_off(self) -> None:
        """Drops every graph, capturing none until the packs change (memory ran out while they were held)."""
        self.clear()
        self.held_off = True

    def run(self, model: MultiLoraModel, step: Pass, compute: Compute, weights: torch.Tensor,
            packs: Sequence[torch.Tensor]) -> torch.Tensor:
        """compute(step, weights)'s per-adapter losses, the step's gradients in the packs' .grad (none
        before): replayed where the step was captured, else computed (and timed or captured)."""
        self.padded = step.plan.bucketed
        self.track(packs)
        key = None if self.held_off else self._key(model, step)
        graph = self.graphs.get(key)
        if graph is not None:
            self.graphs.move_to_end(key)
            self.counts["replayed"] += 1
            return graph.replay(step, weights, packs)
        if key is None or key in self.eager:
            self.counts["eager"] += 1
            return compute(step, weights)
        if step.plan.bucketed:  # small by size: the host's (no timing); on a warm stream, no eager run
            if self.stream is None:
                return self._capture(key, step, compute, weights, packs)
            model.send_plan(step.plan)  # (which the capture cannot send)
            return self._capture_and_replay(key, step, compute, weights, packs)
        first = self.first_runs.get(key)
        if first is not None and first.done() and first.host_bound():
            return self._capture(key, step, compute, weights, packs)
        self.counts["eager"] += 1
        if first is None or not first.done():  # timed (again, where the last timing has not come in)
            return self._first_run(key, step, compute, weights)
        self.eager.add(key)
        return compute(step, weights)

    @staticmethod
    def _key(model: MultiLoraModel, step: Pass) -> tuple:
        """What a graph's host-side choices depend on: the adapters and their sequences' lengths (the plan's
        segments, positions and boundaries), every input's shape and integer, and the switches the forward reads."""
        plan, rows = step.plan, None if step.rows is None else step.rows.shape[0]
        shapes = tuple((name, tuple(v.shape) if isinstance(v, torch.Tensor) else v) for name, v in step.inputs.items())
        # bucketed: the shapes are the bucket's, and the token ranges are read anew at every replay (which
        # adapters have tokens sets how a layer's LoRA adds into its output: Segments.covers_all_tokens)
        layout = tuple(n > 0 for n in plan.token_counts) if plan.bucketed else tuple(map(tuple, plan.lengths))
        switches = (projection_stacks.ENABLED, fused_layers.ENABLED, grouped_terms.FUSED_MATMUL, one_adapter.ENABLED)
        return (plan.ids, layout, plan.row_len, shapes, tuple(step.labels.shape), rows, step.training, model.training,
                model.model.training, switches)

    def _first_run(self, key: tuple, step: Pass, compute: Compute, weights: torch.Tensor) -> torch.Tensor:
        if len(self.first_runs) >= MAX_SEEN:
            self.first_runs.clear()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        losses = compute(step, weights)
        end.record()
        self.first_runs[key] = _FirstRun(start, end, time.perf_counter() - t0)
        return losses

    def _capture(self, key: tuple, step: Pass, compute: Compute, weights: torch.Tensor,
                 packs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The step run eagerly on the capture stream (its results; the stream's warm-up), then captured."""
        self.first_runs.pop(key, None)
        main = torch.cuda.current_stream()
        stream = self.stream or torch.cuda.Stream(main.device)
        stream.wait_stream(main)
        try:
            with torch.cuda.stream(stream):
                losses = compute(step, weights)
        finally:
            main.wait_stream(stream)  # the step's results are read there
        self.stream = stream  # warm (a step ran on it): a later capture on it needs no eager run first
        results = [p.grad for p in packs]
        for p in packs:
            p.grad = None  # the capture's backward makes its own, in the graph's pool
        try:
            self._record(key, step, compute, weights, packs)
        except torch.OutOfMemoryError:  # this step is done (above): memory for its graph is what is short
            self.clear()
            self.eager.add(key)
            self.counts["eager"] += 1
        except RuntimeError as e:  # an op that cannot be captured (a wait for the GPU, host data sent)
            warnings.warn(f"alto: a training step could not be captured as a CUDA graph; it runs eagerly "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})", stacklevel=3)
            self.eager.add(key)
            self.counts["eager"] += 1
        finally:
            for p, grad in zip(packs, results):
                p.grad = grad
        return losses

    def _capture_and_replay(self, key: tuple, step: Pass, compute: Compute, weights: torch.Tensor,
                            packs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The step captured (on a warm stream), then replayed for its results. Out of memory, it is the trainer's
        (run again unpadded: alto.train); another failure, it is captured as _capture does (its ops' warm-up)."""
        try:
            graph = self._record(key, step, compute, weights, packs)
        except torch.OutOfMemoryError:
            self.clear()
            raise
        except RuntimeError:  # captured below, once this exception (holding the failed capture's memory) is gone
            graph = None
        return graph.launch(packs) if graph is not None else self._capture(key, step, compute, weights, packs)

    def _record(self, key: tuple, step: Pass, compute: Compute, weights: torch.Tensor,
                packs: Sequence[torch.Tensor]) -> _Graph:
        """compute(step, weights) captured (the packs' .grad none before), kept among the last CAPACITY."""
        graph = torch.cuda.CUDAGraph()
        try:  # (the outer context restores the current stream where a failed capture's exit raises before it does)
            with torch.cuda.stream(self.stream):
                # thread_local: other threads' CUDA calls (exports, checkpoints) are not the capture's
                # one pool for all: replays never overlap, and their results are copied at once (replay)
                self.pool = (self.pool or torch.cuda.graph_pool_handle()) if BUCKETS else None
                with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                    static_losses = compute(step, weights)
        except RuntimeError:
            for p in packs:
                p.grad = None  # what the failed capture's backward left
            if not self.graphs:  # a failed capture may keep its hold on the pool: the next one takes a new one
                self.pool = None
            raise
        captured = self.graphs[key] = _Graph(graph, step, weights, static_losses, [p.grad for p in packs])
        self.counts["captured"] += 1
        while len(self.graphs) > CAPACITY:
            self.graphs.popitem(last=False)
        return captured
