"""Bucketed packed steps: a training step's token stream padded up to one of a few layouts, so that
steps of variable-length data repeat a layout a CUDA graph replays (alto.step_graphs).

Why: a small model's co-located step waits for its host (SmolLM2-135M, 32 adapters, H100: 153-219 ms
eager against ~53 ms of GPU kernels, bench/RESULTS.md 2026-12-06), and a graph replays only a layout
seen before, which variable-length data rarely repeats. Padded, a step's host-side shapes are its
bucket's: the token positions, the number of sequences, the longest sequence and the number of target
rows, each rounded up a ladder whose steps are at most 1.25x.

The padding is whole sequences of pad tokens without targets after the last adapter's own (the
attention's zero-length sequences after those), and target rows that point at the stream's last
position (which has no target). No real token attends to a pad token and no loss reads one, so the
pads' gradients are exactly zero and every adapter's loss and gradients are the unpadded step's, up
to the order of float sums. Only small steps a graph may take are padded, their sequences whole
(alto.train asks StepGraphs.buckets: by the step's size, not by timings, since the float sums' order
differs): on a step the GPU is busy with, the padding would cost up to a quarter more work. On by
default; ALTO_STEP_BUCKETS=0 turns it off.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LADDER = (4, 5, 6, 7)  # the buckets are m * 2**k for m in LADDER: consecutive ones at most 1.25x apart


def bucket(n: int) -> int:
    """The smallest bucket >= n (at least 4)."""
    k = max(0, n.bit_length() - 3)
    return next((m << k for m in LADDER if m << k >= n), 8 << k)


@dataclass(frozen=True)
class Padding:
    """How a packed step of given sequence lengths is padded to its bucket."""

    sequences: tuple[int, ...]  # lengths of the pad sequences appended (each >= 1)
    empty: int  # zero-length sequences after them (in the attention's boundaries only)
    positions: int  # token positions of the padded stream
    max_length: int  # the longest sequence the attention is told of

    @classmethod
    def of(cls, lengths: Sequence[int]) -> Padding:
        """The padding of sequences of these lengths (at least one)."""
        tokens, longest = sum(lengths), max(lengths)
        positions = bucket(tokens)
        # pads no longer than the longest sequence: no position id beyond the step's own (rotary scalings that
        # follow the largest position, as Phi-3's longrope does, see the unpadded step's)
        full, rest = divmod(positions - tokens, longest)
        pads = (longest,) * full + ((rest,) if rest else ())
        count = len(lengths) + len(pads)
        return cls(pads, bucket(count) - count, positions, bucket(longest))



def padded_rows(rows: torch.Tensor, positions: int) -> torch.Tensor:
    """A padded step's target rows (flat positions; alto.step): as many as their bucket, the added
    ones at the stream's last position, which has no target (no loss, no gradient)."""
    return F.pad(rows, (0, bucket(len(rows)) - len(rows)), value=positions - 1)
