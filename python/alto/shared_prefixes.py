"""Co-located passes compute each adapter's common context prefix once (prefix caching, as vLLM's
automatic prefix caching does at inference): a chat template's default system prompt, say, is
the first half of every short chat sequence (SmolLM2's: 24 of the chatterbot sequences' ~47
tokens), and every sequence of an adapter sees it through the same weights.

In one packed pass, an adapter's first sequence runs whole and its other sequences from their
first own token on; at every layer the attention gives the varlen kernel each sequence's keys and
values whole (its prefix's gathered from the first sequence's rows) and only its own queries, the
kernel's causal mask aligned at the sequences' ends (FlashAttention's bottom-right alignment), so
an own token at whole position p attends to keys 0..p as over the whole sequence. Exact, not an
approximation: a prefix token's keys and values depend only on the tokens before it and the
adapter's weights, the same in every sequence that begins with it. In a training step the
gradients of the prefix's keys and values (the sum over the sequences that read them) flow back
into the first sequence's rows, as they would through each sequence's copy. One pass, not a
prefix pass and another (the first design): a small model's steps are bound by kernel launches,
which a second pass doubled (bench/bench_launches.py). Only context tokens are shared: none of the
shared positions has a next-token target, so no loss is lost (each sequence's first own token is
context too: the target of the last shared position).

Rounding: transformers' RMSNorms compute in float32 whatever the model's dtype, so in a float64 model a
prefix's gradient summed before a norm (here) and after it (each sequence's copy, as PEFT runs it)
differ at float32's 1e-8; with the norms in float64 math they agree to 1e-16 (tests/conftest.py's
float64_norms).

Not shared (alto.step.shared_prefix_lengths): an adapter with LoRA dropout in training (PEFT draws a
mask for every sequence's prefix on its own), a base with its own dropout in training, a step padded
to its bucket (alto.step_buckets: a small step, replayed as a CUDA graph) and ALTO_SHARED_PREFIXES=0
(every sequence whole, as bench A/Bs run). Rotary scaling that depends on
the pass's longest position (dynamic, LongRoPE) shares: that position is the whole sequences'.
"""
from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from alto_ext.segments import to_device

ENABLED = os.environ.get("ALTO_SHARED_PREFIXES", "1") != "0"  # 0: every sequence whole (an A/B of the benches)

# Shared only where it saves at least this share of the pass's token positions: every layer then
# gathers keys and values, and the host builds their index, which a few shared tokens do not repay.
MIN_SAVED_SHARE = 0.1


def shared_lengths(batches: Mapping[str, Sequence[Sequence[int] | torch.Tensor]],
                   alone: Collection[str] = ()) -> list[int] | None:
    """How many leading positions each adapter's sequences share (in batches' order; alto.data's
    tokens: context-only ones negative), or None where sharing would not save MIN_SAVED_SHARE of
    the positions. Shared: the longest common prefix whose tokens after the first are context-only,
    leaving every sequence at least one own token; an adapter with one sequence, or in alone,
    shares nothing."""
    if not ENABLED:
        return None
    out = [0 if aid in alone or len(seqs) < 2 else _shared(seqs) for aid, seqs in batches.items()]
    total = sum(len(s) for seqs in batches.values() for s in seqs)
    saved = sum((len(seqs) - 1) * n for seqs, n in zip(batches.values(), out))
    return out if total and saved >= MIN_SAVED_SHARE * total else None


def _shared(seqs: Sequence[Sequence[int] | torch.Tensor]) -> int:
    """shared_lengths of one adapter's sequences (two or more), reading only their heads up to the
    first sequence's first trained token after its first (a step's whole sequences as Python lists
    would cost milliseconds of host time)."""
    first = seqs[0]
    if isinstance(first, torch.Tensor):
        trained = (first[1:] >= 0).nonzero()
        run = int(trained[0]) + 1 if len(trained) else len(first)
    else:
        run = next((i for i in range(1, len(first)) if first[i] >= 0), len(first))
    if run < 2:  # no context after the first token: nothing to share
        return 0
    heads = [s[:run + 1].tolist() if isinstance(s, torch.Tensor) else list(s[:run + 1]) for s in seqs]
    common = os.path.commonprefix(heads)
    # positions 0..n-1 shared: tokens 0..n-1 the same everywhere, tokens 1..n (their targets) context
    limit = min(len(common), min(len(s) for s in seqs) - 1, run)
    n = 0
    while n < limit and (common[n + 1] < 0 if n + 1 < len(common) else all(h[n + 1] < 0 for h in heads)):
        n += 1
    return n


@dataclass
class SharedPrefixes:
    """One packed pass's shared prefixes, handed to alto.attention's varlen attention (keyword
    shared_prefixes): which rows each sequence's keys and values are read from (key_index, whole
    sequences end to end, each adapter's prefix from its first sequence's rows), their boundaries
    (cu_keys, max_keys) and each row's position past its run's start (position_offsets)."""

    shared: list[int]  # per adapter (batches' order): positions its sequences share (shared_lengths)
    lengths: list[list[int]]  # per adapter, per sequence: its whole length
    device: torch.device
    keep_whole: bool = False  # the attention keeps each layer's keys and values of whole sequences (in whole)
    whole: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        key_index, offsets = [], []
        row = 0
        for n, lengths in zip(self.shared, self.lengths):
            first = row  # the first sequence's rows: its whole length, the prefix's keys read from there
            for j, length in enumerate(lengths):
                skip = n if j else 0
                key_index += [*range(first, first + skip), *range(row, row + length - skip)]
                offsets += [skip] * (length - skip)
                row += length - skip
        whole = [n for lengths in self.lengths for n in lengths]
        self.key_index = to_device(key_index, self.device, torch.int64)
        self.position_offsets = torch.tensor(offsets, dtype=torch.long)  # added to the pass's position ids
        self.cu_keys = to_device(F.pad(torch.tensor(whole).cumsum(0), (1, 0)).to(torch.int32), self.device)
        self.max_keys = max(whole)

    @classmethod
    def of(cls, batches: Mapping[str, Sequence[Sequence[int]]], shared: Sequence[int],
           device: torch.device) -> "SharedPrefixes":
        return cls(list(shared), [[len(s) for s in seqs] for seqs in batches.values()], device)

    def runs(self, batches: Mapping[str, Sequence[Sequence[int]]]) -> dict[str, list[Sequence[int]]]:
        """The pass's sequences: each adapter's first whole, the others without its shared positions."""
        return {aid: [seq[n if j else 0:] for j, seq in enumerate(seqs)]
                for (aid, seqs), n in zip(batches.items(), self.shared)}

    def keys_and_values(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[rows, heads, dim] keys and values of one layer -> every sequence's whole, end to end."""
        whole = k.index_select(0, self.key_index), v.index_select(0, self.key_index)
        if self.keep_whole:
            self.whole[layer] = whole
        return whole
