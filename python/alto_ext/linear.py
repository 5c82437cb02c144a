"""multi_lora_linear: base linear + every adapter's LoRA in one autograd node.

Forward ``y = x Wᵀ + b + s_g (x[t] A_gᵀ) B_g`` for each token's adapter g. Backward computes dX once
for the base and all adapters (``dY W + Σ dh_g A_g`` into one output), and dA, dB with one
weight-grad launch each; no per-adapter copy of X is ever made. Without a base weight it is the
adapters' delta alone (lora_delta), for base layers that run their own forward. Projections that
read the same x run stacked (multi_lora_linear_stack): x read once for all of them.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from alto_ext.grouped_terms import GroupedTerms
from alto_ext.one_adapter import OneAdapter
from alto_ext.segments import Segments, StackedSegments


def _below_autograd(fn):
    """A Function's forward or backward with the alto ops' own autograd layer skipped: these Functions
    are their autograd, and torch.library's layer (Python) costs ~70 us of host time per op call,
    ~40 calls a step at 4 layers x 7 projections, which a step of few tokens waits for. Not while
    torch.compile traces (it does not trace the guard), nor in a backward that builds a graph
    (create_graph: second-order gradients go through that layer)."""
    @functools.wraps(fn)
    def run(*args):
        if torch.compiler.is_compiling() or torch.is_grad_enabled():
            return fn(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return fn(*args)
    return run


class _MultiLoraLinear(torch.autograd.Function):
    @staticmethod
    @_below_autograd
    def forward(ctx, x, weight, bias, lora_x, A, B, seg_indptr, rank_indptr, scaling, h_width, covers_all_tokens,
                one_scale):
        # lora_x=None: the adapters read x itself (no dropout); never pass x twice (torch.compile).
        ctx.lora_x_is_x = lora_x is None
        ctx.covers_all_tokens = covers_all_tokens
        ctx.one = None if one_scale is None else OneAdapter(one_scale)
        terms = ctx.one or GroupedTerms(seg_indptr, rank_indptr, scaling, h_width, covers_all_tokens)
        # A, B arrive in their master dtype: their gradients leave in it, straight from the kernel.
        ctx.a_dtype, ctx.b_dtype = A.dtype, B.dtype
        A, B = A.to(x.dtype), B.to(x.dtype)
        lx = x if lora_x is None else lora_x
        h = terms.shrink(lx, A)
        y = terms.plus(x, None if weight is None else weight.t(), bias, h, B, scaled=True)
        # x itself only for a base weight's gradient (the adapters read lx): with LoRA dropout and a
        # frozen base, x is kept by nothing here (the MLP's product: alto.fused_layers)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, lx, A, B, h, seg_indptr, rank_indptr,
                              scaling)
        return y

    @staticmethod
    @_below_autograd
    def backward(ctx, grad_y):
        x, weight, lora_x, A, B, h, seg_indptr, rank_indptr, scaling = ctx.saved_tensors
        need_x, need_w, need_b, need_lx, need_a, need_b_lora = ctx.needs_input_grad[:6]
        grad_y = grad_y.contiguous()
        terms = ctx.one or GroupedTerms(seg_indptr, rank_indptr, scaling, h.shape[1], ctx.covers_all_tokens)
        grad_h = terms.shrink(grad_y, B, scaled=True)  # dh_g = s_g dY_g B_gᵀ, shared by dA and by dX's LoRA part
        grad_x = grad_w = grad_bias = grad_lx = grad_a = grad_b = None
        if need_x and ctx.lora_x_is_x:  # dX = dY W + Σ dh_g A_g in one output pass
            grad_x = terms.plus(grad_y, weight, None, grad_h, A, scaled=False)
        elif need_x:
            grad_x = torch.zeros_like(lora_x) if weight is None else grad_y @ weight
        if need_lx:
            grad_lx = terms.plus(grad_h, None, None, grad_h, A, scaled=False)
        if need_w:
            grad_w = grad_y.flatten(0, -2).t() @ x.flatten(0, -2)
        if need_b:
            grad_bias = grad_y.flatten(0, -2).sum(0)
        if need_a:
            grad_a = terms.weight_grad(grad_h, lora_x, A.shape[0], False, ctx.a_dtype)
        if need_b_lora:
            grad_b = terms.weight_grad(h, grad_y, B.shape[0], True, ctx.b_dtype)
        return grad_x, grad_w, grad_bias, grad_lx, grad_a, grad_b, None, None, None, None, None, None


class _MultiLoraStack(torch.autograd.Function):
    """multi_lora_linear of P projections that read the same x, in one node (StackedSegments): one
    shrink and one dA read x once for all of them, and dX = sum_p dY_p W_p + dh A is summed in one
    buffer (the adapters' part first, each base GEMM adding its product in its epilogue), where P
    separate nodes would write P partial dX and autograd would add them."""

    @staticmethod
    @_below_autograd
    def forward(ctx, x, parts, stacked, *tensors):
        n = len(parts)
        weights, biases, As, Bs = (tensors[i * n : (i + 1) * n] for i in range(4))
        ctx.a_dtype, ctx.b_dtype = As[0].dtype, Bs[0].dtype
        scales = [OneAdapter.scale_of(s) for s in parts]
        # whole: the stack's terms (its shrink, dX and dA); each: projection p's (its expand, dh and dB)
        ctx.one = None not in scales
        if ctx.one:  # one adapter: its rows of every projection, unpadded; h's blocks are views
            ctx.whole, ctx.each = OneAdapter(1.0), [OneAdapter(scale) for scale in scales]
            ctx.rows = [s.ranks[0] for s in parts]
            A = torch.cat(As).to(x.dtype)
        else:
            seg, width = stacked.segments, stacked.width
            ctx.whole = GroupedTerms(seg.seg_indptr, seg.rank_indptr, None, n * width, seg.covers_all_tokens)
            ctx.each = [GroupedTerms(s.seg_indptr, s.rank_indptr, s.scaling, width, s.covers_all_tokens)
                        for s in parts]
            ctx.rows = stacked.rows
            A = torch.cat([*As, As[0].new_zeros(1, x.shape[1])]).to(x.dtype).index_select(0, stacked.gather)
        Bs = [B.to(x.dtype) for B in Bs]
        h = ctx.whole.shrink(x, A)
        hs = (h.split(ctx.rows, dim=1) if ctx.one else
              [h[:, p * stacked.width : (p + 1) * stacked.width].contiguous() for p in range(n)])
        ys = [terms.plus(x, w.t(), b, hp, B, scaled=True)
              for terms, w, b, hp, B in zip(ctx.each, weights, biases, hs, Bs)]
        ctx.save_for_backward(x, A, *weights, *Bs, *hs)
        return tuple(ys)

    @staticmethod
    @_below_autograd
    def backward(ctx, *grad_ys):
        n = len(ctx.each)
        x, A, *rest = ctx.saved_tensors
        weights, Bs, hs = rest[:n], rest[n : 2 * n], rest[2 * n :]
        need = ctx.needs_input_grad
        need_x, (need_w, need_bias, need_a, need_b) = need[0], (need[3 + i * n : 3 + (i + 1) * n] for i in range(4))
        dys = [g.contiguous() for g in grad_ys]
        # dh_p = s_g dY_p B_pᵀ into column block p (grouped: zeros beyond each adapter's rank, as the stack's h).
        grad_h = torch.cat([terms.shrink(dy, B, scaled=True) for terms, dy, B in zip(ctx.each, dys, Bs)], dim=1)
        grad_x = None
        if need_x:
            grad_x = ctx.whole.plus(dys[0], weights[0], None, grad_h, A, scaled=False)
            for dy, w in zip(dys[1:], weights[1:]):
                grad_x.addmm_(dy, w)
        grad_ws = [dy.t() @ x if wanted else None for dy, wanted in zip(dys, need_w)]
        grad_biases = [dy.sum(0) if wanted else None for dy, wanted in zip(dys, need_bias)]
        grad_as = [None] * n
        if any(need_a):
            grad_a = ctx.whole.weight_grad(grad_h, x, A.shape[0], False, ctx.a_dtype)
            if ctx.one:
                grad_as = [g if wanted else None for g, wanted in zip(grad_a.split(ctx.rows), need_a)]
            else:
                grad_as = [grad_a.index_select(0, rows) if wanted else None for rows, wanted in zip(ctx.rows, need_a)]
        grad_bs = [terms.weight_grad(hp, dy, B.shape[0], True, ctx.b_dtype) if wanted else None
                   for terms, hp, dy, B, wanted in zip(ctx.each, hs, dys, Bs, need_b)]
        return grad_x, None, None, *grad_ws, *grad_biases, *grad_as, *grad_bs


def _check_linear(op: str, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  A: torch.Tensor, B: torch.Tensor, segments: Segments) -> None:
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [T, d_in], got shape {tuple(x.shape)}")
    if weight is not None and (weight.dim() != 2 or weight.shape[1] != x.shape[1]):
        raise ValueError(f"{op}: weight must be [d_out, d_in={x.shape[1]}], got {tuple(weight.shape)}")
    if bias is not None and (weight is None or tuple(bias.shape) != (weight.shape[0],)):
        d_out = "without a weight: None" if weight is None else f"[d_out={weight.shape[0]}]"
        raise ValueError(f"{op}: bias must be {d_out}, got {tuple(bias.shape)}")
    if x.shape[0] != segments.num_tokens:
        raise ValueError(f"{op}: x has {x.shape[0]} tokens but the segments cover {segments.num_tokens}")
    # here, not only in the ops: one adapter's plain GEMMs (alto_ext.one_adapter) read no rank_indptr
    d_out = weight.shape[0] if weight is not None else B.shape[-1]
    want_a, want_b = (segments.total_rank, x.shape[1]), (segments.total_rank, d_out)
    if tuple(A.shape) != want_a or tuple(B.shape) != want_b:
        raise ValueError(f"{op}: A {tuple(A.shape)} and B {tuple(B.shape)}, its segments need A {want_a} "
                         f"and B {want_b}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """x's dtype, or the autocast dtype when autocast is on (as nn.Linear would compute)."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Every adapter's ``s_g (x[t] A_gᵀ) B_g`` on its own rows, alone: ``[T, d_out]``, differentiable
    (multi_lora_linear without a base weight). For a base layer that runs its own forward (what to
    add to ``base(x)``); a plain linear base is faster fused in :func:`multi_lora_linear`."""
    return multi_lora_linear(x, None, None, A, B, segments)


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    segments: Segments,
    lora_x: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x[T, d_in] -> y[T, d_out]`` with base ``weight[d_out, d_in]`` (None: no base term, bias
    None too) and packed adapters.

    ``A[R, d_in]`` and ``B[R, d_out]`` hold every adapter's rows (``segments.rank_indptr``);
    ``lora_x`` is the adapters' input when it differs from ``x`` (LoRA dropout). Everything runs in
    x's dtype, or in the autocast dtype when autocast is on (as nn.Linear would); A and B are cast
    to it inside, and their gradients come back in their own dtype (float32 masters: float32).
    """
    _check_linear("multi_lora_linear", x, weight, bias, A, B, segments)
    dtype = _compute_dtype(x)

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dtype)

    with torch.autocast(x.device.type, enabled=False):
        return _MultiLoraLinear.apply(
            cast(x),
            cast(weight),
            cast(bias),
            cast(lora_x),
            A,
            B,
            segments.seg_indptr,
            segments.rank_indptr,
            segments.scaling,
            segments.h_width,
            segments.covers_all_tokens,
            OneAdapter.scale_of(segments),
        )


def multi_lora_linear_stack(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    parts: Sequence[Segments],
    stacked: StackedSegments,
) -> list[torch.Tensor]:
    """multi_lora_linear of P projections of the same ``x`` (q, k, v; gate, up): their outputs, as
    P calls would give them, with x read once by the shrink and once by dA, and dX in one buffer.
    ``parts[p]``: projection p's segments (its ranks and scalings); ``stacked``:
    ``StackedSegments.build(parts)``. No LoRA dropout (each projection would draw its own mask)."""
    n = len(parts)
    if not n == len(weights) == len(biases) == len(As) == len(Bs):
        raise ValueError(f"multi_lora_linear_stack: {n} segments but {len(weights)} weights, {len(biases)} "
                         f"biases, {len(As)} A and {len(Bs)} B")
    for p, (w, b, s) in enumerate(zip(weights, biases, parts)):
        op = f"multi_lora_linear_stack (projection {p})"
        if w is None:
            raise ValueError(f"{op}: no base weight (lora_delta serves that)")
        _check_linear(op, x, w, b, As[p], Bs[p], s)
    if stacked.ranks != tuple(s.ranks for s in parts) or stacked.segments.token_counts != parts[0].token_counts:
        raise ValueError("multi_lora_linear_stack: stacked was not built from these segments "
                         "(StackedSegments.build(parts))")
    dtype = _compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return list(_MultiLoraStack.apply(
            x.to(dtype), list(parts), stacked, *(w.to(dtype) for w in weights),
            *(None if b is None else b.to(dtype) for b in biases), *As, *Bs))
