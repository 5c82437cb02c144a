"""The loss of a co-located step: every adapter's mean next-token loss over its own target tokens,
from the last hidden states of all adapters' tokens at once.

Two ways to per-token losses:
- on CUDA, a fused head over the frozen LM head (_FrozenHeadCrossEntropy): the logits a chunk of
  rows at a time through liger-kernel's Triton cross-entropy kernel, never all of them (0.6 GiB
  instead of 18.7 GiB at 32k tokens x 128k vocab, bench/bench_loss.py --head);
- elsewhere (the CPU, float64 checks), the LM head's logits and a blocked fp32 cross-entropy
  (_TokenCrossEntropy) that adds no whole fp32 copy of them.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from alto_ext.segments import segment_sums


LOSS_BLOCK_ELEMENTS = 2**28  # fp32 temporaries of one block of logit rows: 1 GiB
# The fused head computes the logits a chunk of rows at a time, each chunk reading the whole head weight.
# A chunk of 1,024 rows does >= 1,024 flops per byte of weight it reads, compute-bound on Hopper (the bf16
# ridge is ~300): smaller chunks re-read the weight (liger's own default makes chunks of about rows x
# hidden logits: 16 rows at 512 tokens of a Llama-3-8B head, 35 ms of a 48 ms step on the H100,
# bench/RESULTS.md 2026-12-06), larger ones only hold more memory. The memory model counts one chunk
# (fused_head_step_bytes).
HEAD_CHUNK_ROWS = 1024


class _TokenCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy in fp32 (float64 for float64 logits), a block of rows at a time. A
    co-located step holds every adapter's tokens (32k tokens x 128k vocab: 8 GiB of bf16 logits); the usual
    `F.cross_entropy(logits.float())` adds a whole fp32 copy and a whole fp32 log-softmax (16 GiB
    each). Here no fp32 tensor is larger than one block: forward keeps only the logits it was given,
    backward recomputes each block's softmax from them."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # [T, V], [T] (-100: none)
        ctx.save_for_backward(logits, targets)
        picked = targets.clamp_min(0)[:, None]
        loss = torch.empty(targets.shape, dtype=_loss_dtype(logits), device=logits.device)
        for rows in _row_blocks(logits):
            log_probs = torch.log_softmax(logits[rows], -1, dtype=loss.dtype)
            loss[rows] = log_probs.gather(1, picked[rows]).squeeze(1).neg_()
        return loss.masked_fill_(targets == -100, 0.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        logits, targets = ctx.saved_tensors
        grad = grad.masked_fill(targets == -100, 0.0)[:, None]
        picked = targets.clamp_min(0)[:, None]
        dtype = _loss_dtype(logits)
        minus_one = torch.full(picked.shape, -1.0, dtype=dtype, device=logits.device)
        out = torch.empty_like(logits)
        for rows in _row_blocks(logits):  # d loss / d logits = (softmax - onehot(target)) * grad
            p = torch.softmax(logits[rows], -1, dtype=dtype).scatter_add_(1, picked[rows], minus_one[rows])
            torch.mul(p, grad[rows], out=out[rows])  # computed in fp32 (or fp64), stored in the logits' dtype
        return out, None


def _loss_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def _row_blocks(logits: torch.Tensor) -> list[slice]:
    rows = max(1, LOSS_BLOCK_ELEMENTS // max(1, logits.shape[1]))
    return [slice(i, i + rows) for i in range(0, logits.shape[0], rows)]


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss at every position of [B, L] labels (-100: no target), as [B, L] fp32
    (float64 for float64 logits); the last position and those whose next label is -100 are 0.
    Memory: see _TokenCrossEntropy."""
    targets = next_token_targets(labels)  # shift the labels, not the (large) logits
    return _TokenCrossEntropy.apply(logits.flatten(0, 1), targets).view(labels.shape)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] labels -> each position's next-token target, flattened [B*L] (-100: none)."""
    return F.pad(labels[:, 1:], (0, 1), value=-100).flatten()


@functools.cache
def _cross_entropy_kernel():
    """liger-kernel's Triton cross-entropy kernel (a row's loss, and its logits' gradient written over
    them), or None where it cannot be imported (no triton)."""
    try:
        from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel
    except ImportError:
        return None
    return liger_cross_entropy_kernel


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of hidden rows [N, d] through a frozen LM head [V, d] (bias [V] or None)
    against targets [N] (-100: none, loss and gradient 0), as [N] fp32: each chunk of rows' logits in
    one GEMM, their losses and gradient in liger's kernel, and (with gradients) the rows' input
    gradient in a second GEMM, in the forward; backward scales each row by its upstream gradient.

    Why not liger's fused_linear_cross_entropy: with per-token losses (reduction "none") it defers
    the gradient to its backward and computes every chunk's logits again there (a third pass of the
    head GEMM, a scaling pass over every [chunk, V] gradient, and a host wait on its target count in
    forward and in backward), since a trainable head's weight gradient must take each token's
    upstream gradient before it sums over tokens. A frozen head has no weight gradient, and a row's
    input gradient is its own logits' gradient times the head: scaled afterwards, exactly."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
        import triton

        rows, vocab = hidden.shape[0], weight.shape[0]
        gradients = ctx.needs_input_grad[0]
        loss = torch.zeros(rows, dtype=torch.float32, device=hidden.device)  # the kernel skips a row without target
        grad = torch.empty_like(hidden) if gradients else None
        chunk = min(rows, HEAD_CHUNK_ROWS)
        logits = torch.empty(chunk, vocab, dtype=hidden.dtype, device=hidden.device)  # one buffer, every chunk
        for start in range(0, rows, chunk):
            end = min(start + chunk, rows)
            part = logits[: end - start]
            torch.mm(hidden[start:end], weight.t(), out=part)
            if bias is not None:
                part.add_(bias)
            _cross_entropy_kernel()[(end - start,)](
                X_ptr=part, X_stride=part.stride(0), Y_ptr=targets[start:end], Y_stride=1, weight_ptr=None,
                loss_ptr=loss[start:end], z_loss_ptr=None, loss_stride=1, token_accuracy_ptr=None,
                token_accuracy_stride=0, predicted_tokens_ptr=None, predicted_tokens_stride=0, n_cols=vocab,
                n_non_ignore=1, sum_non_ignore_weight=1, weight_sum=0.0, ignore_index=-100, lse_square_scale=0.0,
                label_smoothing=0.0, reduction="none", softcap=None, RETURN_Z_LOSS=False,
                RETURN_TOKEN_ACCURACY=False, RETURN_PREDICTED_TOKENS=False,
                BLOCK_SIZE=min(32768, triton.next_power_of_2(vocab)), HAS_WEIGHT=False, HAS_SOFTCAPPING=False,
                HAS_GRADIENTS=gradients, num_warps=32)
            if gradients:  # the kernel left d loss / d logits in `part`
                torch.mm(part, weight, out=grad[start:end])
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        # computed in fp32, stored in the rows' dtype: one rounding, no fp32 copy of [N, d]
        return torch.mul(grad, grad_loss[:, None], out=torch.empty_like(grad)), None, None, None


def fused_head_losses(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      targets: torch.Tensor) -> torch.Tensor:
    """Per-row losses [N] (fp32) of hidden rows [N, d] through a frozen head weight [V, d] (and bias)
    against targets [N] (-100: none), fused (_FrozenHeadCrossEntropy; fused_head_available)."""
    return _FrozenHeadCrossEntropy.apply(hidden, weight, bias, targets)


def fused_head_step_bytes(rows: int, hidden: int, vocab: int, itemsize: int) -> int:
    """Bytes of [chunk, vocab] logits the fused head holds at once in a step over `rows` rows (the
    memory model's PeakModel.head): one chunk, in its forward."""
    return min(rows, HEAD_CHUNK_ROWS) * vocab * itemsize if rows > 0 else 0


def fused_head_available(device: torch.device) -> bool:
    """Whether head_token_losses runs the fused head here: a CUDA device and liger-kernel importable."""
    return device.type == "cuda" and _cross_entropy_kernel() is not None


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """The flat indices of the [B, L] labels' positions that have a next-token target (-100: none).
    On CUDA labels it waits for the GPU (.nonzero()): a step reads them on the host (alto.step)."""
    return (next_token_targets(labels) != -100).nonzero().squeeze(1)


def head_token_losses(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                      rows: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token loss at every position of [B, L] labels from the last hidden states [B, L, d]
    through the LM head, as [B*L] fp32 (float64 for a float64 head), 0 where there is no target.
    The head and the loss run on the positions with a target only (rows: target_positions(labels)):
    a chat record's context-only prompt tokens and each sequence's last position cost nothing.
    On CUDA with liger-kernel and a frozen head, fused (_FrozenHeadCrossEntropy); else the head's
    logits of those rows (under the caller's autocast, as the model's own head) and the blocked
    cross-entropy (_TokenCrossEntropy)."""
    targets = next_token_targets(labels)
    rows = target_positions(labels) if rows is None else rows
    picked, wanted = hidden.flatten(0, 1).index_select(0, rows), targets.index_select(0, rows)
    if rows.numel() == 0:  # no target at all (no chunk to run): zeros, still in the graph
        loss = picked.sum(-1, dtype=_loss_dtype(picked))
    elif fused_head_available(hidden.device) and not head.weight.requires_grad:
        with torch.autocast("cuda", enabled=False):
            loss = fused_head_losses(picked.to(head.weight.dtype), head.weight, head.bias, wanted)
    else:
        logits = head(picked)
        with torch.autocast(hidden.device.type, enabled=False):
            loss = _TokenCrossEntropy.apply(logits, wanted)
    return loss.new_zeros(targets.shape).index_copy(0, rows, loss)


def adapter_loss_sums(token_loss: torch.Tensor, labels: torch.Tensor, token_counts: Sequence[int],
                      index: torch.Tensor | None = None, width: int | None = None) -> torch.Tensor:
    """[2, G]: each adapter's summed next-token loss over its own target tokens, and the number of
    those tokens, from every position's loss (token_losses or head_token_losses, flattened);
    token_counts = positions per adapter of the flattened [B, L] labels (summed per adapter in a
    fixed number of kernels, see segment_sums; index and width: its own, where the caller keeps them)."""
    token_loss = token_loss.flatten()
    has_target = (next_token_targets(labels) != -100).to(token_loss.dtype)
    return segment_sums(torch.stack([token_loss, has_target]), token_counts, index, width)


def mean_losses(loss_sums: torch.Tensor) -> torch.Tensor:
    """[G] mean next-token loss of each adapter over its own target tokens, from adapter_loss_sums
    (0 for an adapter without any)."""
    loss_sum, count = loss_sums[0], loss_sums[1]  # an objective's metric sums may follow (alto.objectives)
    return loss_sum / count.clamp_min(1)
