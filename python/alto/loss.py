"""The loss of a co-located step: every adapter's mean next-token loss over its own target tokens,
from the last hidden states of all adapters' tokens at once.

Two ways to per-token losses, measured on the H100 (bench/bench_loss.py --head, RESULTS.md):
- on CUDA, liger-kernel's fused linear cross-entropy (reduction "none": per-token losses, the
  per-token gradient folded in by its backward), which never materializes the logits: 1.3x faster
  than the head matmul + our blocked loss and 0.6 GiB instead of 18.7 GiB at 32k tokens x 128k vocab;
- elsewhere (the CPU, float64 checks), the LM head's logits and a blocked fp32 cross-entropy
  (_TokenCrossEntropy) that adds no whole fp32 copy of them.
"""
from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from alto_ext.segments import segment_sums


LOSS_BLOCK_ELEMENTS = 2**28  # fp32 temporaries of one block of logit rows: 1 GiB
# liger's fused head computes the logits a chunk of rows at a time and reads the whole head weight once
# per chunk (three times with gradients: the forward, its recomputation in backward, and dX). Its default
# chunk holds about rows x hidden logits: 16 rows at 512 tokens of a Llama-3-8B head (V/H = 31), 32 chunks
# reading the 1 GB weight 64 times, 35 ms of a 48 ms step on the H100 (bench/RESULTS.md 2026-12-06, eighth
# session). A chunk holds at least this many rows instead, or every row: its GEMM then does >= 1024 flops
# per byte of weight it reads, compute-bound on Hopper (the bf16 ridge is ~300), so larger chunks would
# only hold more memory (liger's default where its chunks are larger already). The memory model counts
# the chunks as they are (fused_head_step_bytes, alto.admission.fit_probes).
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
def _fused_linear_cross_entropy():
    """liger-kernel's fused linear cross-entropy, or None where it cannot be imported (no triton)."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def liger_chunk_rows(rows: int, hidden: int, vocab: int, chunk_mem_const: int) -> int:
    """The rows of each chunk liger-kernel's fused_linear_cross_entropy_forward (0.8.x, pyproject.toml)
    makes of `rows` for a [vocab, hidden] head: its own formula (tests/test_loss.py counts its head GEMMs)."""
    chunks_factor = -(-vocab // (chunk_mem_const * hidden))
    per_chunk = -(-rows // chunks_factor)
    return min(rows, 1 << (per_chunk - 1).bit_length())  # triton.next_power_of_2


def head_chunk_mem_const(rows: int, hidden: int, vocab: int) -> int:
    """liger's chunk_mem_const for a fused head over `rows` rows: the least that gives chunks of at
    least HEAD_CHUNK_ROWS rows (or all rows): 1, liger's default, where its chunks are that large.
    Chunks grow with the setting, and ceil(vocab / hidden) makes one chunk of all rows: bisected."""
    want = min(rows, HEAD_CHUNK_ROWS)
    settings = range(1, -(-vocab // hidden) + 1)
    return settings[bisect.bisect_left(settings, True, key=lambda c: liger_chunk_rows(rows, hidden, vocab, c) >= want)]


def fused_head_step_bytes(rows: int, hidden: int, vocab: int, itemsize: int) -> int:
    """Bytes of [chunk, vocab] tensors the fused head holds at once in a training step over `rows`
    rows (the memory model's PeakModel.head): two chunks in its backward, where reduction "none"
    recomputes a chunk's logits and scales their gradient by each row's into a second one."""
    if rows <= 0:
        return 0
    return 2 * liger_chunk_rows(rows, hidden, vocab, head_chunk_mem_const(rows, hidden, vocab)) * vocab * itemsize


def fused_head_available(device: torch.device) -> bool:
    """Whether head_token_losses runs here: a CUDA device and liger-kernel importable."""
    return device.type == "cuda" and _fused_linear_cross_entropy() is not None


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
    On CUDA with liger-kernel, fused; else the head's logits of those rows (under the caller's
    autocast, as the model's own head) and the blocked cross-entropy (_TokenCrossEntropy)."""
    targets = next_token_targets(labels)
    rows = target_positions(labels) if rows is None else rows
    picked, wanted = hidden.flatten(0, 1).index_select(0, rows), targets.index_select(0, rows)
    if rows.numel() == 0:  # no target at all (liger's kernel divides by the row count): zeros, still in the graph
        loss = picked.sum(-1, dtype=_loss_dtype(picked))
    elif fused_head_available(hidden.device):
        with torch.autocast("cuda", enabled=False):
            vocab, width = head.weight.shape
            chunking = head_chunk_mem_const(picked.shape[0], width, vocab)
            loss = _fused_linear_cross_entropy()(picked, head.weight, wanted, head.bias, reduction="none",
                                                  chunk_mem_const=chunking).float()
    else:
        logits = head(picked)
        with torch.autocast(hidden.device.type, enabled=False):
            loss = _TokenCrossEntropy.apply(logits, wanted)
    return loss.new_zeros(targets.shape).index_copy(0, rows, loss)


def adapter_loss_sums(token_loss: torch.Tensor, labels: torch.Tensor, token_counts: Sequence[int]) -> torch.Tensor:
    """[2, G]: each adapter's summed next-token loss over its own target tokens, and the number of
    those tokens, from every position's loss (token_losses or head_token_losses, flattened);
    token_counts = positions per adapter of the flattened [B, L] labels (summed per adapter in a
    fixed number of kernels, see segment_sums)."""
    token_loss = token_loss.flatten()
    has_target = (next_token_targets(labels) != -100).to(token_loss.dtype)
    return segment_sums(torch.stack([token_loss, has_target]), token_counts)


def mean_losses(loss_sums: torch.Tensor) -> torch.Tensor:
    """[G] mean next-token loss of each adapter over its own target tokens, from adapter_loss_sums
    (0 for an adapter without any)."""
    loss_sum, count = loss_sums[0], loss_sums[1]  # an objective's metric sums may follow (alto.objectives)
    return loss_sum / count.clamp_min(1)
