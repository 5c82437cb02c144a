"""Multi-adapter LoRA injected into a Hugging Face causal LM with a frozen base.

Every Linear named like a decoder projection (q_proj, ..., down_proj) is wrapped in a
:class:`MultiLoraLinear`, which keeps the A/B master weights (float32; float64 over a float64 base)
of all its adapters packed in one parameter each; a step runs base + all adapters through
``alto_ext.multi_lora_linear`` (a base layer with its own forward: base(x) + ``alto_ext.lora_delta``). Adapters with different target modules coexist: in a layer an
adapter does not target, its tokens get rank 0 there.

(Over 300 lines for a reason: the step plan, the packed layer and the model that fills it read
each other's rows and ranks; split, each would reach into the others' internals.)
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

import alto_ext
from alto_ext.segments import indptr, indptr_index, segment_index, to_device
from alto import attention, fused_layers
from alto.base import is_nf4
from alto.families import check_targets, family_of
from alto.projection_stacks import ProjectionStack
from alto.registry import AdapterConfig


@dataclass
class StepPlan:
    """The running adapters of one step in batch order: each owns a contiguous range of the step's
    token positions (packed: its sequences end to end; padded: its block of rows)."""

    adapter_ids: list[str]
    lengths: list[list[int]]  # each adapter's sequence lengths in this step
    row_len: int | None  # padded steps: the length every row is padded to; None: packed
    scaling: list[float]
    dropout: list[float]
    generators: list[torch.Generator]  # each adapter's own dropout RNG (migrates with it)
    device: torch.device
    scaling_dtype: torch.dtype = torch.float32  # float64 for a float64 model (exact math)
    configs: list[AdapterConfig] = field(default_factory=list)  # each adapter's (what its objective reads)
    # packed to a bucket (alto.step_buckets): the last adapter's lengths end with the pad sequences, and
    # every host-side shape of the step is the bucket's, whatever the adapters' own token counts
    bucketed: bool = False
    _segments: dict[tuple[int, ...], alto_ext.Segments] = field(default_factory=dict)
    _stacks: dict[tuple[tuple[int, ...], ...], alto_ext.StackedSegments] = field(default_factory=dict)
    _token_cells: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    _sum_index: torch.Tensor | None = None
    _token_indptr: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # asked per projection per step: computed once (plain attributes, which torch.compile traces)
        self.ids = tuple(self.adapter_ids)  # hashable: what layers key their ranks by
        # token positions per adapter (padding included in a padded step)
        self.token_counts = ([sum(lens) for lens in self.lengths] if self.row_len is None
                             else [len(lens) * self.row_len for lens in self.lengths])
        self.any_dropout = any(p > 0 for p in self.dropout)
        # the width of segment_sums' grid: the step's positions where its shape must not follow the counts
        self.sum_width = sum(self.token_counts) if self.bucketed else max(self.token_counts, default=0)

    def token_indptr(self) -> torch.Tensor:
        """The adapters' token ranges (int32 [G+1] on the device), one tensor shared by every layer's
        Segments: what a replayed step's graph (alto.step_graphs) reads anew (refresh)."""
        if self._token_indptr is None:
            self._token_indptr = indptr(self.token_counts, self.device)
        return self._token_indptr

    def refresh(self, other: StepPlan) -> None:
        """Writes the token ranges of `other` (a bucketed plan of the same adapters and bucket) over this
        plan's, in place: a CUDA graph captured with this plan then runs other's step."""
        if self._token_indptr is not None:
            self._token_indptr.copy_(other.token_indptr())

    def segments(self, ranks: tuple[int, ...]) -> alto_ext.Segments:
        """Segments for one layer's rank tuple (built once per step per distinct tuple)."""
        seg = self._segments.get(ranks)
        if seg is None:
            seg = alto_ext.Segments.build(self.token_counts, ranks, self.scaling, self.device, self.scaling_dtype,
                                          seg_indptr=self.token_indptr())
            self._segments[ranks] = seg
        return seg

    def stacked_segments(self, ranks: tuple[tuple[int, ...], ...]) -> alto_ext.StackedSegments:
        """StackedSegments of projections with these rank tuples (alto.projection_stacks), once per step."""
        stacked = self._stacks.get(ranks)
        if stacked is None:
            stacked = alto_ext.StackedSegments.build([self.segments(r) for r in ranks], self.device)
            self._stacks[ranks] = stacked
        return stacked

    def sum_index(self) -> torch.Tensor:
        """segment_sums' index of the adapters' token ranges (their losses summed), once per plan: a
        step's CUDA graph (alto.step_graphs) replays the plan's device tensors, sent before its capture."""
        if self.bucketed:  # from the token ranges on the device, where a replay finds the refreshed ones
            return indptr_index(self.token_indptr(), self.sum_width)
        if self._sum_index is None:
            self._sum_index = segment_index(self.token_counts, self.device)
        return self._sum_index

    def has_dropout(self, ranks: tuple[int, ...]) -> bool:
        """Some adapter with a rank in a layer of these ranks draws LoRA dropout there."""
        return self.any_dropout and any(p > 0 and r > 0 for p, r in zip(self.dropout, ranks))

    def apply_dropout(self, x: torch.Tensor, ranks: tuple[int, ...]) -> torch.Tensor | None:
        """Each adapter's LoRA dropout on its own tokens (one copy of x), or None if all are 0. The
        masks come from each adapter's own generator, drawn only in the layers it targets (ranks
        of this layer) and as [samples, its longest sequence, d], as PEFT draws them for the
        adapter's batch alone, so they depend neither on which adapters share the step nor on
        packing, padding or the rank."""
        if not self.has_dropout(ranks):
            return None
        parts = torch.split(x, self.token_counts)
        return torch.cat([self._dropout(part, p, g, lens) if p > 0 and r > 0 else part for part, p, g, lens, r
                          in zip(parts, self.dropout, self.generators, self.lengths, ranks)])

    def _dropout(self, x: torch.Tensor, p: float, generator: torch.Generator, lengths: list[int]) -> torch.Tensor:
        own = max(lengths)
        keep = x.new_empty(len(lengths), own, x.shape[-1]).bernoulli_(1.0 - p, generator=generator)
        if self.row_len is None:  # packed: each sequence's own positions, end to end
            keep = keep.flatten(0, 1).index_select(0, self.token_cells(lengths, x.device))
        else:  # padded rows: padding positions are never seen by a real token
            keep = torch.nn.functional.pad(keep, (0, 0, 0, self.row_len - own), value=1.0).flatten(0, 1)
        return x * keep / (1.0 - p)

    def token_cells(self, lengths: list[int], device: torch.device) -> torch.Tensor:
        """The cells of a [sequences, longest] grid that hold a token, row by row: where a packed
        adapter's tokens sit in its dropout mask. Found on the host, once per step for every layer
        that reads them: a boolean index of the mask on the GPU waits for it (twice per layer and
        adapter with dropout)."""
        key = tuple(lengths)
        cells = self._token_cells.get(key)
        if cells is None:
            grid = torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]
            cells = self._token_cells[key] = to_device(grid.flatten().nonzero().squeeze(1), device)
        return cells


class _Context:
    """Shared by all wrapped layers of one model: the plan of the step being run."""

    def __init__(self) -> None:
        self.plan: StepPlan | None = None
        self.kept: dict = {}  # outputs computed ahead by a projection stack (alto.projection_stacks)


# An adapter's tensors in one layer, named as PEFT names them, each packed rank-major with every
# adapter's rows in admission order: lora_A [r, in] and lora_B [r, out] (PEFT's lora_B.weight
# transposed, so one expand kernel serves forward and backward). Storage, re-packing, state,
# checkpoints and migration go by these names; another adapter kind (DoRA's magnitude) adds its
# name here, its width and init (_widths, add_adapters), its math in forward and its PEFT layout
# (alto.export.TO_PEFT).
TENSOR_NAMES = ("lora_A", "lora_B")
DRAW_BYTES = 1 << 26  # host memory that one round of fresh adapters' initial draws may fill (MultiLoraModel.add_adapters)
LayerTensors = dict[str, torch.Tensor]  # name -> one adapter's tensor in one layer


def is_plain_float(weight: torch.Tensor) -> bool:
    """A dense float weight (not a quantized packing: an integer dtype or a tensor subclass)."""
    return weight.dtype.is_floating_point and type(weight) in (torch.Tensor, nn.Parameter)


class MultiLoraLinear(nn.Module):
    """A frozen linear layer plus the packed master weights (float32; float64 over a float64 base)
    of every adapter that targets it (TENSOR_NAMES). Adding or removing an adapter re-packs them
    (and any pending gradients) without touching the other adapters' values.

    The base-layer seam: a plain nn.Linear with a dense float weight runs fused with the adapters
    (alto_ext.multi_lora_linear: one output pass, dX computed once); any other Linear with a dense
    float weight, or with an NF4 weight (alto.base.quantize_nf4), runs its own forward, base(x), plus
    the adapters' delta. Other quantized weights are refused."""

    def __init__(self, base: nn.Linear, context: _Context, dtype: torch.dtype):
        super().__init__()
        if not (is_plain_float(base.weight) or is_nf4(base.weight)):
            raise ValueError(f"{type(base).__name__} with a {type(base.weight).__name__} weight of dtype "
                             f"{base.weight.dtype}: only dense float and NF4 (base.quantize: nf4) base layers are supported")
        self.base = base
        self.fused = type(base) is nn.Linear and is_plain_float(base.weight)
        self.context = context
        self.stack: ProjectionStack | None = None  # set by MultiLoraModel when siblings read its input
        self.order: list[str] = []  # adapters in pack order
        self.rows: dict[str, tuple[int, int]] = {}  # adapter -> (first row, rank)
        self._value_views = None  # split_packs' of the packs' values, with what it split
        self._ranks: tuple[tuple[str, ...], tuple[int, ...]] | None = None  # ranks()' last (adapters, ranks)
        # AdamW's moments in the packs' layout (exp_avg of each pack, then exp_avg_sq of each), re-packed
        # with them, so that one kernel steps every adapter's rows (alto.optim); None until asked for
        self.moments: list[torch.Tensor] | None = None
        widths = self._widths()
        for name in TENSOR_NAMES:
            setattr(self, name, nn.Parameter(torch.zeros(0, widths[name], dtype=dtype, device=base.weight.device)))

    def _widths(self) -> dict[str, int]:
        return {"lora_A": self.base.in_features, "lora_B": self.base.out_features}

    def packs(self) -> list[nn.Parameter]:
        # from the parameter dict itself: Module.__getattr__'s lookup cost ~3 ms of a SmolLM2 step's
        # host time (840 calls)
        params = self._parameters
        return [params[name] for name in TENSOR_NAMES]

    def _repack(self, keep: list[str], added: LayerTensors | None = None, added_ranks: Sequence[int] = ()) -> None:
        """Rebuilds the packs from the kept adapters' rows followed by the added adapters' (self.order
        already lists them, in that order; `added`: their tensors, rank-major, end to end), pending
        gradients included (zero for the added ones). One rebuild however many adapters come or go:
        adding or removing them one at a time re-packs every layer once per adapter (measured: 3.4 s
        for the 32 adapters of a 1B-widths sweep finishing in the same step)."""
        def gather(t: torch.Tensor | None, extra: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            parts = [t[self.rows[a][0] : self.rows[a][0] + self.rows[a][1]] for a in keep]
            if extra is not None:
                parts.append(extra)
            return torch.cat(parts) if parts else t[:0]

        for name, pack in zip(TENSOR_NAMES, self.packs()):
            extra = None if added is None else added[name]
            packed = nn.Parameter(gather(pack.detach(), extra))
            packed.grad = gather(pack.grad, None if extra is None else torch.zeros_like(extra))
            setattr(self, name, packed)
        if self.moments is not None and not self.order:  # an emptied layer (the run's end): made anew if asked
            self.moments = None
        elif self.moments is not None:  # zero for the added rows
            self.moments = [gather(m, None if added is None else torch.zeros_like(added[name]))
                            for m, name in zip(self.moments, TENSOR_NAMES * 2)]
        ranks = [self.rows[a][1] for a in keep] + list(added_ranks)
        self._value_views = self._ranks = None  # the old packs' storage freed now; the rows moved
        self.rows, row = {}, 0
        for a, r in zip(self.order, ranks, strict=True):
            self.rows[a] = (row, r)
            row += r

    def add_adapters(self, new: Sequence[tuple[str, LayerTensors]]) -> None:
        """Adds adapters (id, its tensors here: lora_A [r, in] and lora_B [r, out], or no lora_B:
        zeros, PEFT's init) after the present ones, in the packs' dtype and device."""
        like = self.lora_A
        keep = list(self.order)
        self.order.extend(aid for aid, _ in new)
        As = [t["lora_A"] for _, t in new]
        Bs = [t["lora_B"] if t.get("lora_B") is not None else like.new_zeros(len(A), self.base.out_features)
              for A, (_, t) in zip(As, new)]

        def joined(ts: list[torch.Tensor]) -> torch.Tensor:
            # Each piece to the packs' device (from pinned memory without waiting), joined there: a
            # host-side concatenation and one pageable copy took 5.1 s for the 32 fresh adapters of a
            # 1B-widths sweep on the H200 (its host copies memory at ~1-3 GB/s).
            return torch.cat([t.to(like.device, non_blocking=like.is_cuda) for t in ts]).to(like.dtype)

        self._repack(keep, {"lora_A": joined(As), "lora_B": joined(Bs)}, [len(A) for A in As])

    def initial_A(self, rank: int, generator: torch.Generator, pinned: bool = False) -> torch.Tensor:
        """PEFT's default init of lora_A, kaiming_uniform(a=sqrt(5)), drawn on the CPU in float32
        whatever the master dtype (the same seed gives the same initial values); pinned: into
        page-locked memory (copied to a GPU without waiting)."""
        bound = 1.0 / math.sqrt(self.base.in_features)
        out = torch.empty(rank, self.base.in_features, dtype=torch.float32, pin_memory=pinned)
        return out.uniform_(-bound, bound, generator=generator)

    def remove_adapters(self, adapter_ids: Sequence[str]) -> None:
        gone = set(adapter_ids)
        self.order = [a for a in self.order if a not in gone]
        self._repack(list(self.order))

    def _slice(self, t: torch.Tensor | None, adapter_id: str) -> torch.Tensor | None:
        r0, r = self.rows[adapter_id]
        return None if t is None else t[r0 : r0 + r]

    def weights(self, adapter_id: str) -> LayerTensors:
        """Detached copies of the adapter's tensors, by name."""
        return {name: self._slice(pack.detach(), adapter_id).clone() for name, pack in zip(TENSOR_NAMES, self.packs())}

    def tensors(self, adapter_id: str) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Views of the adapter's rows, in TENSOR_NAMES order: (values, gradients or None)."""
        packs = self.packs()
        return ([self._slice(p.detach(), adapter_id) for p in packs], [self._slice(p.grad, adapter_id) for p in packs])

    def moment_views(self, adapter_id: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Views of the adapter's rows of the moments (exp_avg, exp_avg_sq; TENSOR_NAMES order each),
        the moments made (zeros) on first use."""
        if self.moments is None:
            self.moments = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in self.packs() * 2]
        views = [self._slice(m, adapter_id) for m in self.moments]
        n = len(TENSOR_NAMES)
        return views[:n], views[n:]

    def split_packs(self) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor] | None]]:
        """Each pack's values and gradients (None: no gradient buffer) split into its adapters' rows,
        in self.order: one split per buffer. The values' split is kept while the packs keep their
        storage: the optimizer asks every step, and 32 adapters' views of SmolLM2's 420 packs took
        ~25 ms of a 2-core CPU's time per step."""
        sizes = [self.rows[a][1] for a in self.order]
        packs = self.packs()
        # by storage, not by Parameter alone: Module.to() swaps a Parameter's data in place (the kept
        # packs and views hold the old objects and storage alive: their ids and addresses cannot recur)
        key = [(id(p), p.data_ptr(), p.device) for p in packs]
        if self._value_views is None or self._value_views[0] != key:
            self._value_views = (key, packs, [list(torch.split(p.detach(), sizes)) for p in packs])
        return self._value_views[2], [None if p.grad is None else list(torch.split(p.grad, sizes)) for p in packs]

    def ranks(self, plan: StepPlan) -> tuple[int, ...]:
        """Each of the plan's adapters' rank here (0: not targeted); kept for the next plan of the
        same adapters (every step's, until adapters come or go: _repack forgets it)."""
        ids = plan.ids
        if self._ranks is None or self._ranks[0] != ids:
            self._ranks = (ids, tuple(self.rows[a][1] if a in self.rows else 0 for a in ids))
        return self._ranks[1]

    def packs_for(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """lora_A and lora_B rows of the plan's adapters, in its order."""
        present = [a for a in plan.adapter_ids if a in self.rows]
        if present == self.order:  # the usual case: the packs are used as they are
            return self.lora_A, self.lora_B
        # a subset or another order (e.g. evaluating one adapter)
        return (torch.cat([self._slice(self.lora_A, a) for a in present]),
                torch.cat([self._slice(self.lora_B, a) for a in present]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.context.plan
        if plan is None or not self.order or not plan.ids:  # (no adapter in the pass: an objective's reference)
            return self.base(x)
        if self.stack is not None:
            y = self.stack.output(self, x, plan)
            if y is not None:
                return y
        ranks = self.ranks(plan)
        if not any(ranks):
            return self.base(x)
        A, B = self.packs_for(plan)
        x2 = x.reshape(-1, x.shape[-1])
        lora_x = plan.apply_dropout(x2, ranks) if self.training else None
        segments = plan.segments(ranks)
        if self.fused:
            y = alto_ext.multi_lora_linear(x2, self.base.weight, self.base.bias, A, B, segments, lora_x=lora_x)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        y = self.base(x)
        delta = alto_ext.lora_delta(x2 if lora_x is None else lora_x, A, B, segments)
        return y + delta.reshape(y.shape).to(y.dtype)


class MultiLoraModel(nn.Module):
    """A frozen causal LM whose projections carry any number of co-located adapters. Adapter
    master weights are float32, or float64 over a float64 base: there every op, scale, loss and
    optimizer step runs in float64, so co-located training can be checked exactly against PEFT."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        attention.register()  # packed steps switch the model to it (forward)
        base_dtype = next(model.parameters()).dtype
        self.adapter_dtype = torch.float64 if base_dtype == torch.float64 else torch.float32
        self.context = _Context()
        self.family = family_of(model.config)  # which Linear layers are projections a LoRA may target
        self.layers: dict[str, MultiLoraLinear] = {}
        for path, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and child_name in self.family.names:
                    wrapped = MultiLoraLinear(child, self.context, self.adapter_dtype)
                    setattr(module, child_name, wrapped)
                    self.layers[f"{path}.{child_name}" if path else child_name] = wrapped
        if not self.layers:
            raise ValueError(f"no Linear layer named one of {self.family.names} in the model")
        for module in model.modules():
            for names in self.family.input_groups:
                members = [m for m in (getattr(module, n, None) for n in names) if isinstance(m, MultiLoraLinear)]
                if len(members) > 1:
                    stack = ProjectionStack(members, self.context.kept)
                    for m in members:
                        m.stack = stack
        fused_layers.install(model)  # liger's norm, SwiGLU and RoPE kernels in CUDA steps (forward)
        # whether the base draws dropout masks in training (its modules are fixed once wrapped: looked
        # for once, not in every step: ~600 modules of SmolLM2, 4 ms of a 2-core CPU's step)
        self.base_dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
        self.configs: dict[str, AdapterConfig] = {}
        self.generators: dict[str, torch.Generator] = {}  # adapter -> its dropout RNG
        self._norm_index: tuple | None = None  # grad_norms': (what it was built for, [slot, place] index, width, packs)
        self.layout_version = 0  # counts the times adapters came or went: the packs' rows moved

    def target_layers(self, config: AdapterConfig) -> list[str]:
        return [p for p in self.layers if p.rsplit(".", 1)[-1] in config.target_modules]

    def add_adapters(self, configs: Mapping[str, AdapterConfig],
                     weights: Mapping[str, Mapping[str, LayerTensors]] | None = None) -> None:
        """Adds adapters (id -> config) after the present ones, re-packing each layer once: with the
        given weights (id -> adapter_weights' layout), else PEFT's init from each one's seed: lora_A
        kaiming_uniform(a=sqrt(5)) drawn from the adapter's own generator layer after layer, B = 0.
        The CPU draws are slow (~50M values a second on a core; a 1B-widths adapter of rank 64 has
        21M) and independent between adapters: one thread task per adapter draws its tensors of a run
        of layers (torch releases the GIL while drawing), a run at a time (_draw_rounds: host memory
        holds at most DRAW_BYTES of draws)."""
        weights = weights or {}
        check_targets(self.family, configs)  # all checked before anything changes
        for aid, config in configs.items():
            if aid in self.configs:
                raise ValueError(f"adapter {aid!r} is already in the model")
            paths = self.target_layers(config)
            if not paths:
                raise ValueError(f"adapter {aid!r}: none of {config.target_modules} exist in the model")
            if aid in weights:
                self._check_weights(aid, config, paths, weights[aid])
        generators = {aid: torch.Generator().manual_seed(c.seed) for aid, c in configs.items() if aid not in weights}
        device = next(iter(self.layers.values())).lora_A.device
        targets = {path: [aid for aid, c in configs.items() if path.rsplit(".", 1)[-1] in c.target_modules]
                   for path in self.layers}

        def draws(aid: str, paths: list[str]) -> dict[str, torch.Tensor]:
            # one adapter's lora_A of these layers, in layer order (its generator's order whatever the rounds)
            return {p: self.layers[p].initial_A(configs[aid].rank, generators[aid], device.type == "cuda")
                    for p in paths if aid in targets[p]}

        with ThreadPoolExecutor(max(1, min(len(generators), torch.get_num_threads()))) as pool:
            for paths in self._draw_rounds(configs, generators, targets):
                drawn = dict(zip(generators, pool.map(lambda aid: draws(aid, paths), generators)))
                for p in paths:
                    if targets[p]:
                        self.layers[p].add_adapters([(aid, weights[aid][p] if aid in weights else {"lora_A": drawn[aid][p]})
                                                     for aid in targets[p]])
                del drawn  # before the next round draws: one round's draws held at a time
        for aid, config in configs.items():
            self.configs[aid] = config
            self.generators[aid] = torch.Generator(device).manual_seed(config.seed)
        self._norm_index = None  # the rows moved (and the old packs are freed now)
        self.layout_version += 1

    def _draw_rounds(self, configs: Mapping[str, AdapterConfig], generators: Mapping[str, torch.Generator],
                     targets: Mapping[str, list[str]]) -> Iterator[list[str]]:
        """The layers in runs whose fresh lora_A draws (float32) fill at most DRAW_BYTES of host
        memory together (a layer's own may be more): each adapter draws a whole run in one task.
        A task per adapter and layer (6,720 for 32 adapters on SmolLM2) spent more time handing
        work to the threads than drawing."""
        run, held = [], 0
        for p, layer in self.layers.items():
            size = 4 * layer.base.in_features * sum(configs[aid].rank for aid in targets[p] if aid in generators)
            if run and held + size > DRAW_BYTES:
                yield run
                run, held = [], 0
            run.append(p)
            held += size
        if run:
            yield run

    def zero_weights(self, config: AdapterConfig) -> dict[str, LayerTensors]:
        """Weights of zeros for the adapter, on the model's device in add_adapters' layout: for
        probe steps, whose memory does not depend on the values (no init drawn on the CPU)."""
        return {p: {name: self.layers[p].lora_A.new_zeros(config.rank, width) for name, width in self.layers[p]._widths().items()}
                for p in self.target_layers(config)}

    def _check_weights(self, aid: str, config: AdapterConfig, paths: list[str], given: Mapping[str, LayerTensors]) -> None:
        """Given weights hold the adapter's target layers, each tensor [rank, width] (a mismatch would
        shift every later adapter's rows in the packs)."""
        if sorted(given) != sorted(paths):
            raise ValueError(f"adapter {aid!r}: weights given for {sorted(given)}, its layers are {paths}")
        for p in paths:
            widths = self.layers[p]._widths()
            for name in TENSOR_NAMES:
                t = given[p].get(name)
                if t is None or tuple(t.shape) != (config.rank, widths[name]):
                    raise ValueError(f"adapter {aid!r}: {p}.{name} is {None if t is None else tuple(t.shape)}, "
                                     f"expected {(config.rank, widths[name])}")

    def adapter_tensors(self, adapter_id: str) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Views of the adapter's weights and gradients in a fixed order (layer path, then
        TENSOR_NAMES): what the optimizer updates in place."""
        return self.adapters_tensors([adapter_id])[adapter_id]

    def adapters_tensors(self, adapter_ids: Sequence[str]) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor | None]]]:
        """adapter_tensors of several adapters, with one split per packed buffer instead of a
        slice per adapter and layer (thousands of host calls per step with 32 adapters)."""
        out: dict[str, tuple[list, list]] = {a: ([], []) for a in adapter_ids}
        for layer in self.layers.values():  # the order of target_layers
            if not out.keys() & layer.rows.keys():
                continue
            values, grads = layer.split_packs()
            for i, a in enumerate(layer.order):
                if a in out:
                    mine_v, mine_g = out[a]
                    for v, g in zip(values, grads):
                        mine_v.append(v[i])
                        mine_g.append(None if g is None else g[i])
        return out

    def adapter_moments(self, adapter_id: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Views of the adapter's AdamW moments (exp_avg, exp_avg_sq) in adapter_tensors' order
        (each layer's made, zeros, on first use)."""
        exp_avg, exp_avg_sq = [], []
        for p in self.target_layers(self.configs[adapter_id]):
            m, v = self.layers[p].moment_views(adapter_id)
            exp_avg += m
            exp_avg_sq += v
        return exp_avg, exp_avg_sq

    def grad_norms(self, adapter_ids: Sequence[str]) -> torch.Tensor:
        """Each adapter's gradient norm, clip_grad_norm_'s (the 2-norm of all its gradients), in
        adapter_ids' order (0 without gradients): every pack's rows' sums of squares (one op over
        all packs: alto::row_sq_norms) put in an [adapter, row] grid and summed per adapter
        (deterministic: no atomic adds). The norm of each adapter's tensor of each layer instead is
        13,440 tensors a step for 32 adapters on SmolLM2's 210 projections: as many host calls (and a
        stack of their results); a norm per pack, 420."""
        packs = [(layer, p) for layer in self.layers.values() if layer.order for p in layer.packs() if p.grad is not None]
        if not packs or not adapter_ids:  # (none asked: a micro-step that steps no adapter, grad_accum)
            return torch.zeros(len(adapter_ids), dtype=self.adapter_dtype)
        grads = [p.grad for _, p in packs]
        # the index holds every adapter of the model: it outlives steps that step only some (grad_accum);
        # kept with the packs it was built for (alive: their ids cannot recur) and their device
        built_for = (tuple(id(p) for _, p in packs), grads[0].device)  # forgotten when adapters come or go
        if self._norm_index is None or self._norm_index[0] != built_for:
            self._norm_index = (built_for, *self._grid_index(packs, list(self.configs), grads[0].device), packs)
        _, index, width, _ = self._norm_index
        rows = torch.ops.alto.row_sq_norms(grads)
        grid = rows.new_zeros(len(self.configs), width)
        grid[index[0], index[1]] = rows
        slot = {a: i for i, a in enumerate(self.configs)}
        return grid.sum(1).sqrt().index_select(0, to_device([slot[a] for a in adapter_ids], rows.device, torch.long))

    @staticmethod
    def _grid_index(packs: list[tuple[MultiLoraLinear, torch.Tensor]], adapter_ids: list[str],
                    device: torch.device) -> tuple[torch.Tensor, int]:
        """grad_norms' [2, rows] index: each row of the packs' concatenation -> (its adapter's slot in
        adapter_ids; its place among that adapter's rows), and the grid's width (the most rows of one adapter)."""
        slot_of = {a: i for i, a in enumerate(adapter_ids)}
        filled = [0] * len(adapter_ids)
        slots, lengths, shifts, row = [], [], [], 0
        for layer, _ in packs:
            for a in layer.order:  # a pack's rows, in order
                r, slot = layer.rows[a][1], slot_of[a]
                slots.append(slot)
                lengths.append(r)
                shifts.append(filled[slot] - row)  # its rows' place among the adapter's: row + shift
                filled[slot] += r
                row += r
        lengths_t = torch.tensor(lengths)
        slot_t = torch.repeat_interleave(torch.tensor(slots), lengths_t)
        place_t = torch.repeat_interleave(torch.tensor(shifts), lengths_t) + torch.arange(row)
        return to_device(torch.stack([slot_t, place_t]), device), max(filled)

    def clear_grads(self, adapter_ids: list[str]) -> None:
        """Zeroes these adapters' gradients. A layer whose adapters are all listed drops its
        gradient buffers (no kernel); others zero just those rows (the rest are accumulating)."""
        done = set(adapter_ids)
        for layer in self.layers.values():
            if done.issuperset(layer.order):
                for pack in layer.packs():
                    pack.grad = None
                continue
            for a in done.intersection(layer.order):
                for g in layer.tensors(a)[1]:
                    if g is not None:
                        g.zero_()

    def adapter_weights(self, adapter_id: str, views: bool = False) -> dict[str, LayerTensors]:
        """layer path -> {tensor name: detached copy} (views: the packs' rows themselves, which the
        next optimizer step changes)."""
        if views:
            return {p: dict(zip(TENSOR_NAMES, self.layers[p].tensors(adapter_id)[0]))
                    for p in self.target_layers(self.configs[adapter_id])}
        return {p: self.layers[p].weights(adapter_id) for p in self.target_layers(self.configs[adapter_id])}

    def load_adapter_grads(self, adapter_id: str, grads: Sequence[torch.Tensor]) -> None:
        """Sets the adapter's pending (accumulated) gradients, in adapter_tensors' order; layers
        without gradient buffers get zero ones for their other adapters."""
        paths, n = self.target_layers(self.configs[adapter_id]), len(TENSOR_NAMES)
        if len(grads) != n * len(paths):
            raise ValueError(f"adapter {adapter_id!r}: {len(grads)} gradients given, {n * len(paths)} expected")
        for i, p in enumerate(paths):
            layer = self.layers[p]
            for pack in layer.packs():
                if pack.grad is None:
                    pack.grad = torch.zeros_like(pack)
            for view, g in zip(layer.tensors(adapter_id)[1], grads[n * i : n * (i + 1)]):
                view.copy_(g)

    def remove_adapters(self, adapter_ids: Sequence[str]) -> None:
        """Takes adapters out of every layer (re-packing each layer once); their state is the
        caller's to keep first (alto.train.Trainer.release)."""
        gone = set(adapter_ids)
        if len(gone) != len(adapter_ids) or not gone <= self.configs.keys():
            raise ValueError(f"cannot remove {list(adapter_ids)}: ids must be distinct adapters of the model")
        for layer in self.layers.values():
            if gone.intersection(layer.order):
                layer.remove_adapters([a for a in layer.order if a in gone])
        self._norm_index = None  # the rows moved (and the old packs are freed now)
        self.layout_version += 1
        for aid in adapter_ids:
            del self.configs[aid], self.generators[aid]

    def send_plan(self, plan: StepPlan) -> None:
        """Builds the plan's device data that the wrapped layers read (the token ranges, the segments of each
        rank tuple, the projection stacks'), sending it now: a CUDA graph's capture cannot send host data
        (alto.step_graphs captures a padded step without running it first; what this misses fails the capture)."""
        plan.token_indptr()
        for layer in self.layers.values():
            ranks = layer.ranks(plan)
            if layer.order and any(ranks):
                plan.segments(ranks)
            if layer.stack is not None:
                layer.stack.send(plan)

    @property
    def plain_head(self) -> nn.Linear | None:
        """The LM head if the logits are exactly head(last hidden state) (no soft-capping or scaling
        after it), so a fused head + loss kernel may replace them; else None."""
        head, config = self.model.get_output_embeddings(), self.model.config
        scaled = any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
        return head if type(head) is nn.Linear and not scaled else None

    def forward(self, plan: StepPlan, last_hidden: bool = False, past_key_values=None,
                **inputs: torch.Tensor | int) -> torch.Tensor:
        """Logits [rows, positions, vocab] (last_hidden: the decoder's last hidden states instead,
        [rows, positions, d], for plain_head) of a step built by alto.step.step_inputs: padded rows
        (input_ids, attention_mask) or one packed row (input_ids, position_ids, cu_seq_lens_q,
        max_length_q: attention alto.attention's varlen); adapters own plan's token ranges.
        past_key_values: a transformers Cache that the forward extends (decoding: alto.generate)."""
        unknown = [a for a in plan.adapter_ids if a not in self.configs]
        if unknown:
            raise ValueError(f"step plan names adapters not in the model: {unknown}")
        config = self.model.config
        usual = config._attn_implementation
        self.context.plan = plan
        if plan.row_len is None:
            config._attn_implementation = attention.NAME  # read by every layer at each forward
        try:
            cache = {"use_cache": past_key_values is not None, "past_key_values": past_key_values}
            with fused_layers.active():
                if last_hidden:
                    return self.model.get_decoder()(**inputs, **cache).last_hidden_state
                return self.model(**inputs, **cache).logits
        finally:
            self.context.plan = None
            self.context.kept.clear()
            config._attn_implementation = usual


def plan_for(model: MultiLoraModel, adapter_ids: Sequence[str], lengths: Sequence[Sequence[int]],
             row_len: int | None, device: torch.device, bucketed: bool = False) -> StepPlan:
    """The plan of a step holding sequences of these lengths per adapter, packed (row_len None) or
    each padded to row_len (bucketed: see StepPlan)."""
    configs = [model.configs[a] for a in adapter_ids]
    return StepPlan(list(adapter_ids), [list(lens) for lens in lengths], row_len, [c.scaling for c in configs],
                    [c.dropout for c in configs], [model.generators[a] for a in adapter_ids], device,
                    model.adapter_dtype, configs=configs, bucketed=bucketed)
