"""Co-located passes compute each adapter's common context prefix once (prefix caching, as vLLM's
automatic prefix caching does at inference): a chat template's default system prompt, say, is
the first half of every short chat sequence (SmolLM2's: 24 of the chatterbot sequences' ~47
tokens), and every sequence of an adapter sees it through the same weights.

A packed pass whose adapters' sequences share one runs twice: first each adapter's shared prefix
once (its keys and values kept, layer by layer), then every sequence's own tokens, each attending
to its adapter's prefix keys and values and to its own. Exact, not an approximation: a prefix
token's keys and values depend only on the tokens before it and the adapter's weights, so they are
the same in every sequence that begins with it, and the own tokens' attention reads the same keys
and values in the same order as over the whole sequence. In a training step the gradients of the
prefix's keys and values (the sum over the sequences that read them) flow back through the prefix
pass, as they would through each sequence's copy. Only context tokens are shared: none of the
shared positions has a next-token target, so no loss is lost (each sequence's first own token is
context too: it is the target of the last shared position, which the pass does not compute).

Rounding: transformers' RMSNorms compute in float32 whatever the model's dtype, so in a float64 model a
prefix's gradient summed before a norm (here) and after it (each sequence's copy, as PEFT runs it)
differ at float32's 1e-8; with the norms in float64 math they agree to 1e-16 (tests/conftest.py's
float64_norms).

Not shared (alto.step.shared_prefix_lengths): an adapter with LoRA dropout in training (PEFT draws a
mask for every sequence's prefix on its own), a base with its own dropout in training, rotary angles
that depend on a pass's longest position (dynamic, LongRoPE: the prefix pass is shorter), and a
sharded base's training steps (its ranks' forwards must meet).
"""
from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from alto_ext.segments import to_device

# Two passes only where the first saves at least this share of the pass's token positions: each
# forward has a fixed host cost (its kernel launches), which a few shared tokens do not repay.
MIN_SAVED_SHARE = 0.1


def shared_lengths(batches: Mapping[str, Sequence[Sequence[int] | torch.Tensor]],
                   alone: Collection[str] = ()) -> list[int] | None:
    """How many leading positions each adapter's sequences share (in batches' order; alto.data's
    tokens: context-only ones negative), or None where sharing would not save MIN_SAVED_SHARE of
    the positions. Shared: the longest common prefix whose tokens after the first are context-only,
    leaving every sequence at least one own token; an adapter with one sequence, or in alone,
    shares nothing."""
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
    shared_prefixes): the prefix pass records each layer's keys and values ([prefix tokens, heads,
    dim], the adapters' prefixes end to end); the own-token pass then gives each sequence its whole
    length, its adapter's prefix first, to the same varlen kernel (the prefix positions' queries
    zero, their outputs dropped)."""

    shared: list[int]  # per adapter (batches' order): positions its sequences share (shared_lengths)
    lengths: list[list[int]]  # per adapter, per sequence: its whole length
    device: torch.device
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # by layer index, from the prefix pass
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    recording: bool = True  # the prefix pass; then the own-token pass
    keep_whole: bool = False  # the own-token pass keeps each layer's keys and values of whole sequences (in whole)
    whole: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        prefix_total = sum(self.shared)
        key_index, own_rows, own_offsets = [], [], []
        prefix_start = own_start = whole_start = 0
        for n, lengths in zip(self.shared, self.lengths):
            for length in lengths:  # a sequence's keys: its adapter's prefix, then its own tokens
                key_index += [*range(prefix_start, prefix_start + n),
                              *range(prefix_total + own_start, prefix_total + own_start + length - n)]
                own_rows += range(whole_start + n, whole_start + length)
                own_offsets += [n] * (length - n)
                own_start, whole_start = own_start + length - n, whole_start + length
            prefix_start += n
        whole = [n for lengths in self.lengths for n in lengths]
        self.key_index = to_device(key_index, self.device, torch.int64)
        self.own_rows = to_device(own_rows, self.device, torch.int64)
        self.own_offsets = torch.tensor(own_offsets, dtype=torch.long)  # added to the own pass's position ids
        self.cu_whole = to_device(F.pad(torch.tensor(whole).cumsum(0), (1, 0)).to(torch.int32), self.device)
        self.max_whole = max(whole)

    @classmethod
    def of(cls, batches: Mapping[str, Sequence[Sequence[int]]], shared: Sequence[int],
           device: torch.device) -> "SharedPrefixes":
        return cls(list(shared), [[len(s) for s in seqs] for seqs in batches.values()], device)

    def prefixes(self, batches: Mapping[str, Sequence[Sequence[int]]]) -> dict[str, list[Sequence[int]]]:
        """The prefix pass's sequences: each adapter's shared prefix once (adapters sharing none left out)."""
        return {aid: [seqs[0][:n]] for (aid, seqs), n in zip(batches.items(), self.shared) if n}

    def own(self, batches: Mapping[str, Sequence[Sequence[int]]]) -> dict[str, list[Sequence[int]]]:
        """The own-token pass's sequences: each without its shared positions."""
        return {aid: [seq[n:] for seq in seqs] for (aid, seqs), n in zip(batches.items(), self.shared)}

    def attention_inputs(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
        """[T, heads, dim] q, k, v of one layer -> (q, k, v, cu_seq_lens, max_len) over every
        sequence's whole length for the varlen kernel; None in the prefix pass (its keys and values
        kept, the pass attends as usual)."""
        if self.recording:
            self.keys[layer], self.values[layer] = k, v
            return None
        first = layer in self.keys  # no prefix pass where nothing is shared
        whole_k = torch.cat([self.keys[layer], k] if first else [k]).index_select(0, self.key_index)
        whole_v = torch.cat([self.values[layer], v] if first else [v]).index_select(0, self.key_index)
        whole_q = q.new_zeros(len(self.key_index), *q.shape[1:]).index_copy_(0, self.own_rows, q)
        if self.keep_whole:
            self.whole[layer] = whole_k, whole_v
        return whole_q, whole_k, whole_v, self.cu_whole, self.max_whole

    def own_outputs(self, out: torch.Tensor) -> torch.Tensor:
        """The own tokens' rows of the attention's output over whole sequences."""
        return out.index_select(0, self.own_rows)
