"""Segments: the host-validated description of one step's adapter segments, uploaded once.

Every op takes ``seg_indptr``/``rank_indptr`` device tensors. Building them through
:class:`Segments` checks the values on the host (where the trainer already knows them), so a bad
batch fails here with a clear message instead of inside a kernel.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# h's row stride must be a multiple of 8 elements (16 bytes) for the Hopper TMA kernels.
H_WIDTH_ALIGN = 8


def to_device(values: Sequence | torch.Tensor, device: torch.device | str | None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host data (a list or a CPU tensor) on `device` without waiting for the GPU: a plain copy to
    CUDA synchronizes with all queued work, this one is staged in pinned memory and sent async.
    A tensor already on a GPU is moved as .to() moves it."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    device = torch.device(device if device is not None else "cpu")
    if device.type != "cuda" or t.is_cuda:
        return t.to(device)
    if torch.cuda.is_current_stream_capturing():
        # a CUDA graph would replay the copy from this pinned buffer, freed and reused by then
        raise RuntimeError("alto_ext.to_device: host data sent while a CUDA graph is captured")
    return t.pin_memory().to(device, non_blocking=True)


def segment_index(counts: Sequence[int], device: torch.device | str | None) -> torch.Tensor:
    """segment_sums' [2, sum(counts)] (run, position) index of runs of these lengths, on `device`."""
    run = [i for i, n in enumerate(counts) for _ in range(n)]
    position = [j for n in counts for j in range(n)]
    return to_device([run, position], device, torch.int64)


def indptr_index(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """segment_index of the runs that start at offsets (int32 [runs + 1], ending at total), computed on
    their device: a CUDA graph that computes it reads the offsets anew at every replay."""
    positions = torch.arange(total, device=offsets.device, dtype=offsets.dtype)
    run = torch.searchsorted(offsets[1:], positions, right=True)
    return torch.stack([run, positions.long() - offsets[run].long()])


def segment_sums(values: torch.Tensor, counts: Sequence[int], index: torch.Tensor | None = None,
                 width: int | None = None) -> torch.Tensor:
    """Sums of consecutive runs along values' last dim, counts[i] elements each (0 allowed):
    [..., len(counts)]. Laid out in a [run, position] grid and summed: a fixed number of kernels
    whatever the number of runs, and deterministic (no atomic scatter-add). index: segment_index(counts)
    on values' device, where the caller keeps it; width: the grid's (>= the longest run; default that)."""
    index = segment_index(counts, values.device) if index is None else index
    grid = values.new_zeros(*values.shape[:-1], len(counts), max(counts, default=0) if width is None else width)
    grid[..., index[0], index[1]] = values
    return grid.sum(-1)


def indptr(counts: Sequence[int], device: torch.device | str | None) -> torch.Tensor:
    """The int32 [len(counts) + 1] offsets of runs of these lengths, on `device`."""
    ptr = [0]
    for c in counts:
        ptr.append(ptr[-1] + c)
    if ptr[-1] >= 2**31:
        raise ValueError(f"total {ptr[-1]} does not fit the int32 index tensors")
    return to_device(ptr, device, torch.int32)


def _check_counts(name: str, values: Sequence[int]) -> list[int]:
    out = []
    for g, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}[{g}] must be a non-negative int, got {v!r}")
        out.append(v)
    return out


@dataclass(frozen=True)
class Segments:
    """Token segments and rank ranges of G adapter slots, as device index tensors."""

    seg_indptr: torch.Tensor  # int32 [G+1]
    rank_indptr: torch.Tensor  # int32 [G+1]
    scaling: torch.Tensor | None  # float32 [G] (float64 for float64 operands), or None for 1
    token_counts: tuple[int, ...]
    ranks: tuple[int, ...]
    num_tokens: int = field(init=False)
    total_rank: int = field(init=False)
    covers_all_tokens: bool = field(init=False)
    h_width: int = field(init=False)
    # scaling's values on the host: () where scaling is None, None where only the device holds them (set by
    # build, which knows them; a Segments made or replaced otherwise cannot have them out of step with scaling)
    scale_values: tuple[float, ...] | None = field(init=False)

    @classmethod
    def build(
        cls,
        token_counts: Sequence[int],
        ranks: Sequence[int],
        scaling: Sequence[float] | None = None,
        device: torch.device | str | None = None,
        scaling_dtype: torch.dtype = torch.float32,
        seg_indptr: torch.Tensor | None = None,
    ) -> Segments:
        """scaling_dtype: float32 (what every kernel takes), or float64 for float64 operands
        (the exact-math checks: alpha/r is then not rounded to float32). seg_indptr: indptr(token_counts)
        already on the device, shared with other segments of the same tokens (not sent again)."""
        tokens = _check_counts("token_counts", token_counts)
        rank_list = _check_counts("ranks", ranks)
        if len(tokens) != len(rank_list):
            raise ValueError(
                f"token_counts has {len(tokens)} entries but ranks has {len(rank_list)}: "
                "one of each per adapter slot"
            )
        scale_t = None
        if scaling is not None:
            scale_list = [float(s) for s in scaling]
            if len(scale_list) != len(tokens):
                raise ValueError(
                    f"scaling has {len(scale_list)} entries but there are {len(tokens)} adapter slots"
                )
            for g, s in enumerate(scale_list):
                if s != s or s in (float("inf"), float("-inf")):
                    raise ValueError(f"scaling[{g}] must be finite, got {s}")
            scale_t = to_device(scale_list, device, scaling_dtype)

        if seg_indptr is None:
            seg_indptr = indptr(tokens, device)
        elif tuple(seg_indptr.shape) != (len(tokens) + 1,) or seg_indptr.dtype != torch.int32:
            raise ValueError(f"seg_indptr must be int32 [{len(tokens) + 1}], got {seg_indptr.dtype} "
                             f"{tuple(seg_indptr.shape)}")
        segments = cls(seg_indptr, indptr(rank_list, device), scale_t, tuple(tokens), tuple(rank_list))
        if scaling is not None:
            object.__setattr__(segments, "scale_values", tuple(scale_list))
        return segments

    def __post_init__(self) -> None:
        # What the ops ask per projection per step, computed once (fields, not properties: torch.compile
        # traces attribute reads; functools.cached_property's lock it cannot).
        object.__setattr__(self, "num_tokens", sum(self.token_counts))
        object.__setattr__(self, "total_rank", sum(self.ranks))
        # every token belongs to an adapter with a rank: a non-accumulating expand writes every row
        object.__setattr__(self, "covers_all_tokens", all(r > 0 for n, r in zip(self.token_counts, self.ranks) if n > 0))
        # the width of the shrink output h: the largest rank rounded up to 8 columns
        object.__setattr__(self, "h_width", -(-max(self.ranks, default=0) // H_WIDTH_ALIGN) * H_WIDTH_ALIGN)
        object.__setattr__(self, "scale_values", () if self.scaling is None else None)


@dataclass(frozen=True)
class StackedSegments:
    """Projections that read the same x (q, k, v; gate, up), stacked for one shrink that reads x once.

    Column block p of the stacked h (``width`` columns, the same for every projection) holds
    projection p's h: adapter g's A rows of projection p, then zero rows up to ``width``. Every
    projection's h is then the slice ``h[:, p*width:(p+1)*width]`` whatever the adapter: the kernels
    take a row range per adapter, not a column offset. The padding costs multiply-adds of zeros in
    the shrink and dA, hidden behind their reading of x while the stack is narrow (a caller's
    choice: alto.projection_stacks stacks at most 256 columns of several adapters; one adapter's stack runs
    unpadded, alto_ext.one_adapter)."""

    segments: Segments  # the stack's: rank P*width for an adapter with a rank in any projection, else 0
    width: int
    gather: torch.Tensor  # int64 [R_stack]: the rows of cat(A_0, ..., A_{P-1}, one zero row), stacked
    rows: tuple[torch.Tensor, ...]  # per projection, int64 [R_p]: where its A rows sit in the stack
    ranks: tuple[tuple[int, ...], ...]  # the projections' ranks it was built for

    @classmethod
    def build(cls, parts: Sequence[Segments], device: torch.device | str | None = None) -> StackedSegments:
        if len({p.token_counts for p in parts}) != 1:
            raise ValueError("stacked projections must share one token layout, got "
                             f"{[p.token_counts for p in parts]}")
        width = max(p.h_width for p in parts)
        total = sum(p.total_rank for p in parts)  # the zero row's index in the concatenated A's
        starts = [0]
        for p in parts[:-1]:
            starts.append(starts[-1] + p.total_rank)
        gather: list[int] = []
        rows: list[list[int]] = [[] for _ in parts]
        ranks = []
        cursor = [0] * len(parts)  # each projection's next A row
        for g in range(len(parts[0].ranks)):
            if not any(p.ranks[g] for p in parts):
                ranks.append(0)
                continue
            ranks.append(len(parts) * width)
            for i, p in enumerate(parts):
                r = p.ranks[g]
                rows[i].extend(range(len(gather), len(gather) + r))
                gather.extend(range(starts[i] + cursor[i], starts[i] + cursor[i] + r))
                gather.extend([total] * (width - r))
                cursor[i] += r
        segments = Segments.build(parts[0].token_counts, ranks, None, device, seg_indptr=parts[0].seg_indptr)
        return cls(segments, width, to_device(gather, device, torch.int64),
                   tuple(to_device(r, device, torch.int64) for r in rows), tuple(p.ranks for p in parts))
