"""multi_lora_linear: base linear + every adapter's LoRA in one autograd node.

Forward ``y = x Wᵀ + b + s_g (x[t] A_gᵀ) B_g`` for each token's adapter g. Backward computes dX once
for the base and all adapters (``dY W + Σ dh_g A_g`` into one output), and dA, dB with one
weight-grad launch each; no per-adapter copy of X is ever made. Without a base weight it is the
adapters' delta alone (lora_delta), for base layers that run their own forward. Projections that
read the same x run stacked (multi_lora_linear_stack): x read once for all of them.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

from alto_ext._ops import ops
from alto_ext.one_adapter import OneAdapter
from alto_ext.segments import Segments, StackedSegments


# ALTO_FUSED_MATMUL=0: the base GEMM and the adapters' expand as two kernels (an A/B switch for the benches).
FUSED_MATMUL = os.environ.get("ALTO_FUSED_MATMUL", "1") != "0"


def _dense_plus_lora(a, b, bias, h, lora_w, seg_indptr, rank_indptr, scaling, covers_all_tokens):
    """``a @ b (+ bias)`` (b None: 0) plus every adapter's ``s_g h_g W_g`` on its rows. On a GPU,
    alto::lora_matmul: on Hopper one GEMM whose K runs over the base's columns, then the adapter's
    (the output written once, the adapters' product never leaving the registers). Otherwise, when
    every row belongs to an adapter with a rank, the adapters write the output first and the base
    GEMM adds its product in its epilogue (beta = 1): the output is not read and written again by a
    separate LoRA pass. Eager only: torch 2.11's dynamo traces the in-place-built output's gradient
    as zeros."""
    if b is None:
        out = a.new_zeros(a.shape[0], lora_w.shape[1])
        ops.lora_expand_(out, h, lora_w, seg_indptr, rank_indptr, scaling)
        return out
    eager = not torch.compiler.is_compiling()
    if FUSED_MATMUL and a.is_cuda and bias is None and eager:
        return ops.lora_matmul(a, b, h, lora_w, seg_indptr, rank_indptr, scaling)
    if covers_all_tokens and bias is None and eager:
        out = a.new_empty(a.shape[0], b.shape[1])
        ops.lora_expand_(out, h, lora_w, seg_indptr, rank_indptr, scaling, False)
        return out.addmm_(a, b)
    out = a @ b if bias is None else torch.addmm(bias, a, b)
    ops.lora_expand_(out, h, lora_w, seg_indptr, rank_indptr, scaling)
    return out


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
        # A, B arrive in their master dtype: their gradients leave in it, straight from the kernel.
        ctx.a_dtype, ctx.b_dtype = A.dtype, B.dtype
        A, B = A.to(x.dtype), B.to(x.dtype)
        lx = x if lora_x is None else lora_x
        base_t = None if weight is None else weight.t()
        if ctx.one is not None:
            h = ctx.one.shrink(lx, A)
            y = ctx.one.plus(x, base_t, bias, h, B, scaled=True)
        else:
            h = ops.lora_shrink(lx, A, seg_indptr, rank_indptr, h_width, None)
            y = _dense_plus_lora(x, base_t, bias, h, B, seg_indptr, rank_indptr, scaling, covers_all_tokens)
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
        grad_y, one = grad_y.contiguous(), ctx.one
        # dh_g = s_g dY_g B_gᵀ, shared by dA and by the LoRA part of dX.
        grad_h = (one.shrink(grad_y, B, scaled=True) if one is not None
                  else ops.lora_shrink(grad_y, B, seg_indptr, rank_indptr, h.shape[1], scaling))
        grad_x = grad_w = grad_bias = grad_lx = grad_a = grad_b = None
        if need_x and ctx.lora_x_is_x:  # dX = dY W + Σ dh_g A_g in one output pass
            grad_x = (one.plus(grad_y, weight, None, grad_h, A, scaled=False) if one is not None else
                      _dense_plus_lora(grad_y, weight, None, grad_h, A, seg_indptr, rank_indptr, None,
                                       ctx.covers_all_tokens))
        elif need_x:
            grad_x = torch.zeros_like(lora_x) if weight is None else grad_y @ weight
        if need_lx and one is not None:
            grad_lx = grad_h @ A
        elif need_lx:
            grad_lx = torch.zeros_like(lora_x)
            ops.lora_expand_(grad_lx, grad_h, A, seg_indptr, rank_indptr, None)
        if need_w:
            grad_w = grad_y.flatten(0, -2).t() @ x.flatten(0, -2)
        if need_b:
            grad_bias = grad_y.flatten(0, -2).sum(0)
        if need_a:
            grad_a = (one.weight_grad(grad_h, lora_x, False, ctx.a_dtype) if one is not None else
                      ops.lora_weight_grad(grad_h, lora_x, seg_indptr, rank_indptr, A.shape[0], None, ctx.a_dtype))
        if need_b_lora:
            grad_b = (one.weight_grad(h, grad_y, True, ctx.b_dtype) if one is not None else
                      ops.lora_weight_grad(h, grad_y, seg_indptr, rank_indptr, B.shape[0], scaling, ctx.b_dtype))
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
        ctx.parts, ctx.stacked = parts, stacked
        ctx.a_dtype, ctx.b_dtype = As[0].dtype, Bs[0].dtype
        scales = [OneAdapter.scale_of(s) for s in parts]
        ctx.ones = None if None in scales else [OneAdapter(scale) for scale in scales]
        Bs = [B.to(x.dtype) for B in Bs]
        if ctx.ones is not None:  # one adapter: its rows of every projection, unpadded; h's blocks are views
            A = torch.cat(As).to(x.dtype)
            h = ctx.ones[0].shrink(x, A)
            hs = h.split([s.ranks[0] for s in parts], dim=1)
            ys = [one.plus(x, w.t(), b, hp, B, scaled=True)
                  for one, w, b, hp, B in zip(ctx.ones, weights, biases, hs, Bs)]
        else:
            A = torch.cat([*As, As[0].new_zeros(1, x.shape[1])]).to(x.dtype).index_select(0, stacked.gather)
            seg, width = stacked.segments, stacked.width
            h = ops.lora_shrink(x, A, seg.seg_indptr, seg.rank_indptr, n * width, None)
            hs = [h[:, p * width : (p + 1) * width].contiguous() for p in range(n)]
            ys = [_dense_plus_lora(x, w.t(), b, hp, B, s.seg_indptr, s.rank_indptr, s.scaling, s.covers_all_tokens)
                  for w, b, hp, B, s in zip(weights, biases, hs, Bs, parts)]
        ctx.save_for_backward(x, A, *weights, *Bs, *hs)
        return tuple(ys)

    @staticmethod
    @_below_autograd
    def backward(ctx, *grad_ys):
        parts, stacked = ctx.parts, ctx.stacked
        n, seg = len(parts), stacked.segments
        x, A, *rest = ctx.saved_tensors
        weights, Bs, hs = rest[:n], rest[n : 2 * n], rest[2 * n :]
        need = ctx.needs_input_grad
        need_x, (need_w, need_bias, need_a, need_b) = need[0], (need[3 + i * n : 3 + (i + 1) * n] for i in range(4))
        dys, ones = [g.contiguous() for g in grad_ys], ctx.ones
        # dh_p = s_g dY_p B_pᵀ into column block p (grouped: zeros beyond each adapter's rank, as the stack's h).
        grad_h = torch.cat([one.shrink(dy, B, scaled=True) for one, dy, B in zip(ones, dys, Bs)] if ones else
                           [ops.lora_shrink(dy, B, s.seg_indptr, s.rank_indptr, stacked.width, s.scaling)
                            for dy, B, s in zip(dys, Bs, parts)], dim=1)
        grad_x = None
        if need_x:
            grad_x = (ones[0].plus(dys[0], weights[0], None, grad_h, A, scaled=False) if ones else
                      _dense_plus_lora(dys[0], weights[0], None, grad_h, A, seg.seg_indptr, seg.rank_indptr, None,
                                       seg.covers_all_tokens))
            for dy, w in zip(dys[1:], weights[1:]):
                grad_x.addmm_(dy, w)
        grad_ws = [dy.t() @ x if wanted else None for dy, wanted in zip(dys, need_w)]
        grad_biases = [dy.sum(0) if wanted else None for dy, wanted in zip(dys, need_bias)]
        grad_as = [None] * n
        if any(need_a) and ones:
            grad_a = ones[0].weight_grad(grad_h, x, False, ctx.a_dtype).split([s.ranks[0] for s in parts])
            grad_as = [g if wanted else None for g, wanted in zip(grad_a, need_a)]
        elif any(need_a):
            grad_a = ops.lora_weight_grad(grad_h, x, seg.seg_indptr, seg.rank_indptr, A.shape[0], None, ctx.a_dtype)
            grad_as = [grad_a.index_select(0, rows) if wanted else None for rows, wanted in zip(stacked.rows, need_a)]
        grad_bs = [(one.weight_grad(hp, dy, True, ctx.b_dtype) if one is not None else
                    ops.lora_weight_grad(hp, dy, s.seg_indptr, s.rank_indptr, B.shape[0], s.scaling, ctx.b_dtype))
                   if wanted else None
                   for one, hp, dy, s, B, wanted in zip(ones or [None] * n, hs, dys, parts, Bs, need_b)]
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
