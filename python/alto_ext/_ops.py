"""Typed wrappers, fake (meta) kernels and autograd formulas of the torch.ops.alto ops.

Contracts (G adapter slots; rows ``seg_indptr[g]:seg_indptr[g+1]`` of token-major tensors belong to
slot g; rows ``rank_indptr[g]:rank_indptr[g+1]`` of rank-major weights are adapter g's, r_g rows;
``scaling[g]`` defaults to 1):

- ``lora_shrink(x[T,d], W[R,d]) -> h[T,h_width]``: ``h[t, :r_g] = s_g x[t] W_gᵀ``, other columns 0.
- ``lora_expand_(y[T,d], h[T,H], W[R,d])``: ``y[t] += s_g h[t, :r_g] W_g`` in place;
  ``accumulate=False``: ``y[t] = ...`` without reading y, rows of rank-0 adapters untouched.
- ``lora_expand``: the same, returning a new tensor (differentiable).
- ``lora_matmul(a[T,K], b[K,N], h[T,H], W[R,N]) -> [T,N]``: ``a @ b`` plus ``s_g h[t, :r_g] W_g`` on
  adapter g's rows (differentiable): a base linear (b = its weight transposed) or its dX (b = the
  weight) and the adapters' term, on Hopper in one GEMM that writes the output once.
- ``lora_weight_grad(h[T,H], x[T,d]) -> [R,d]``: ``out[W_g rows] = s_g h_g[:, :r_g]ᵀ x_g``, in
  ``out_dtype`` (default x's; float32 for float32 master weights of bf16 compute).
- ``packed_adamw_(params, grads, exp_avgs, exp_avg_sqs, row_slot, slot_call, hyper, norms, counts,
  beta1, beta2, eps)``: AdamW of every adapter's rows of every pack at once (csrc/ops.cpp says how
  rows map to adapters; alto.optim.MultiAdamW calls it). On CUDA a bad index is skipped, not read past,
  and raised as below.
- ``row_sq_norms(tensors)``: each row's sum of squares of 2-D tensors, their rows end to end (the
  gradient clip's input: alto.model.MultiLoraModel.grad_norms).

On CUDA the index tensors are validated on the device without a host sync: a bad index is never
read past, the failing launch computes nothing for that adapter, and the error is raised at the next
ALTO op call or :func:`check_errors` (immediately with :func:`set_sync_checks`).
"""
from __future__ import annotations

import torch

from alto_ext import _C

ops = torch.ops.alto


def check_errors() -> None:
    """Raise ValueError for a bad index found on the GPU by an earlier op (synchronizes)."""
    _C.check_errors()


def set_sync_checks(enabled: bool) -> None:
    """Synchronize after every CUDA op so index errors are raised by the op that hit them."""
    _C.set_sync_checks(bool(enabled))


def sync_checks() -> bool:
    """Whether every CUDA op synchronizes after its launch (set_sync_checks, or ALTO_SYNC_CHECKS=1)."""
    return _C.sync_checks()


def _check_types(op: str, tensors: dict, ints: dict | None = None) -> None:
    """ValueError naming the argument for a wrong Python type (the dispatcher's own is a RuntimeError)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) and not (t is None and name == "scaling"):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, v in (ints or {}).items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{op}: {name} must be an int, got {v!r}")


def lora_shrink(
    x: torch.Tensor,
    W: torch.Tensor,
    seg_indptr: torch.Tensor,
    rank_indptr: torch.Tensor,
    h_width: int,
    scaling: torch.Tensor | None = None,
) -> torch.Tensor:
    _check_types("lora_shrink", dict(x=x, W=W, seg_indptr=seg_indptr, rank_indptr=rank_indptr, scaling=scaling),
                 dict(h_width=h_width))
    return ops.lora_shrink(x, W, seg_indptr, rank_indptr, h_width, scaling)


def lora_expand_(
    y: torch.Tensor,
    h: torch.Tensor,
    W: torch.Tensor,
    seg_indptr: torch.Tensor,
    rank_indptr: torch.Tensor,
    scaling: torch.Tensor | None = None,
    accumulate: bool = True,
) -> torch.Tensor:
    _check_types("lora_expand_", dict(y=y, h=h, W=W, seg_indptr=seg_indptr, rank_indptr=rank_indptr,
                                      scaling=scaling))
    ops.lora_expand_(y, h, W, seg_indptr, rank_indptr, scaling, accumulate)
    return y


def lora_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    W: torch.Tensor,
    seg_indptr: torch.Tensor,
    rank_indptr: torch.Tensor,
    scaling: torch.Tensor | None = None,
) -> torch.Tensor:
    _check_types("lora_expand", dict(y=y, h=h, W=W, seg_indptr=seg_indptr, rank_indptr=rank_indptr,
                                     scaling=scaling))
    return ops.lora_expand(y, h, W, seg_indptr, rank_indptr, scaling)


def lora_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    h: torch.Tensor,
    W: torch.Tensor,
    seg_indptr: torch.Tensor,
    rank_indptr: torch.Tensor,
    scaling: torch.Tensor | None = None,
) -> torch.Tensor:
    _check_types("lora_matmul", dict(a=a, b=b, h=h, W=W, seg_indptr=seg_indptr, rank_indptr=rank_indptr,
                                      scaling=scaling))
    return ops.lora_matmul(a, b, h, W, seg_indptr, rank_indptr, scaling)


def lora_weight_grad(
    h: torch.Tensor,
    x: torch.Tensor,
    seg_indptr: torch.Tensor,
    rank_indptr: torch.Tensor,
    total_rank: int,
    scaling: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    _check_types("lora_weight_grad", dict(h=h, x=x, seg_indptr=seg_indptr, rank_indptr=rank_indptr,
                                          scaling=scaling), dict(total_rank=total_rank))
    return ops.lora_weight_grad(h, x, seg_indptr, rank_indptr, total_rank, scaling, out_dtype)


# ---- fake kernels: shapes only, so torch.compile / FakeTensor can trace the ops -----------------


@torch.library.register_fake("alto::lora_shrink")
def _(x, W, seg_indptr, rank_indptr, h_width, scaling=None):
    return x.new_empty((x.shape[0], h_width))


@torch.library.register_fake("alto::lora_expand_")
def _(y, h, W, seg_indptr, rank_indptr, scaling=None, accumulate=True):
    return None


@torch.library.register_fake("alto::lora_expand")
def _(y, h, W, seg_indptr, rank_indptr, scaling=None):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.register_fake("alto::lora_matmul")
def _(a, b, h, W, seg_indptr, rank_indptr, scaling=None):
    return a.new_empty((a.shape[0], b.shape[1]))


@torch.library.register_fake("alto::lora_weight_grad")
def _(h, x, seg_indptr, rank_indptr, total_rank, scaling=None, out_dtype=None):
    return x.new_empty((total_rank, x.shape[1]), dtype=out_dtype or x.dtype)


@torch.library.register_fake("alto::packed_adamw_")
def _(params, grads, exp_avgs, exp_avg_sqs, row_slot, slot_call, hyper, norms, counts, beta1, beta2, eps):
    return None


@torch.library.register_fake("alto::row_sq_norms")
def _(tensors):
    return tensors[0].new_empty((sum(t.shape[0] for t in tensors),))


# ---- autograd: every gradient is another segmented op ------------------------------------------


def _shrink_setup(ctx, inputs, output):
    x, W, seg_indptr, rank_indptr, _h_width, scaling = inputs
    ctx.save_for_backward(x, W, seg_indptr, rank_indptr, scaling)


def _shrink_backward(ctx, grad_h):
    x, W, seg_indptr, rank_indptr, scaling = ctx.saved_tensors
    grad_x = grad_W = None
    if ctx.needs_input_grad[0]:
        grad_x = ops.lora_expand(torch.zeros_like(x), grad_h, W, seg_indptr, rank_indptr, scaling)
    if ctx.needs_input_grad[1]:
        grad_W = ops.lora_weight_grad(grad_h, x, seg_indptr, rank_indptr, W.shape[0], scaling)
    return grad_x, grad_W, None, None, None, None


def _expand_setup(ctx, inputs, output):
    _y, h, W, seg_indptr, rank_indptr, scaling = inputs
    ctx.save_for_backward(h, W, seg_indptr, rank_indptr, scaling)


def _expand_backward(ctx, grad_out):
    h, W, seg_indptr, rank_indptr, scaling = ctx.saved_tensors
    grad_h = grad_W = None
    if ctx.needs_input_grad[1]:
        grad_h = ops.lora_shrink(grad_out, W, seg_indptr, rank_indptr, h.shape[1], scaling)
    if ctx.needs_input_grad[2]:
        grad_W = ops.lora_weight_grad(h, grad_out, seg_indptr, rank_indptr, W.shape[0], scaling)
    return grad_out, grad_h, grad_W, None, None, None


def _matmul_setup(ctx, inputs, output):
    a, b, h, W, seg_indptr, rank_indptr, scaling = inputs
    ctx.save_for_backward(a, b, h, W, seg_indptr, rank_indptr, scaling)


def _matmul_backward(ctx, grad_out):
    """out = a b + s_g h_g W_g: da = dout bᵀ, db = aᵀ dout, and the expand's dh, dW."""
    a, b, h, W, seg_indptr, rank_indptr, scaling = ctx.saved_tensors
    grad_a = grad_b = grad_h = grad_W = None
    if ctx.needs_input_grad[0]:
        grad_a = grad_out @ b.t()
    if ctx.needs_input_grad[1]:
        grad_b = a.t() @ grad_out
    if ctx.needs_input_grad[2]:
        grad_h = ops.lora_shrink(grad_out, W, seg_indptr, rank_indptr, h.shape[1], scaling)
    if ctx.needs_input_grad[3]:
        grad_W = ops.lora_weight_grad(h, grad_out, seg_indptr, rank_indptr, W.shape[0], scaling)
    return grad_a, grad_b, grad_h, grad_W, None, None, None


def _weight_grad_setup(ctx, inputs, output):
    h, x, seg_indptr, rank_indptr, _total_rank, scaling, _out_dtype = inputs
    ctx.save_for_backward(h, x, seg_indptr, rank_indptr, scaling)


def _weight_grad_backward(ctx, grad_out):
    """out_g = s_g h_gᵀ x_g: dh_g = s_g x_g dout_gᵀ (a shrink by dout), dx_g = s_g h_g dout_g (an
    expand). Reached by second-order gradients (a backward that builds a graph), in x's dtype."""
    h, x, seg_indptr, rank_indptr, scaling = ctx.saved_tensors
    grad_out = grad_out.to(x.dtype)
    grad_h = grad_x = None
    if ctx.needs_input_grad[0]:
        grad_h = ops.lora_shrink(x, grad_out, seg_indptr, rank_indptr, h.shape[1], scaling)
    if ctx.needs_input_grad[1]:
        grad_x = ops.lora_expand(torch.zeros_like(x), h, grad_out, seg_indptr, rank_indptr, scaling)
    return grad_h, grad_x, None, None, None, None, None


torch.library.register_autograd("alto::lora_shrink", _shrink_backward, setup_context=_shrink_setup)
torch.library.register_autograd("alto::lora_expand", _expand_backward, setup_context=_expand_setup)
torch.library.register_autograd("alto::lora_matmul", _matmul_backward, setup_context=_matmul_setup)
torch.library.register_autograd("alto::lora_weight_grad", _weight_grad_backward, setup_context=_weight_grad_setup)
