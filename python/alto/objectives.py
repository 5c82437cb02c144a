"""Objectives: what a sample of an adapter's data is, and how each adapter's loss comes from a
co-located step's per-token losses.

A step (alto.step.colocated_losses: training, held-out losses and admission's probe steps alike)
runs every adapter's samples through the shared model and its LM head once, giving every
position's next-token loss (the negative log-probability of its target; alto.loss); the objective
reduces those to each adapter's summed loss and the count its mean divides by. A sample is
`per_sample` sequences taken together: data streams serve whole samples and held-out passes never
split one (a preference pair's chosen and rejected answers meet in one step of one adapter).
An objective with `references` also needs each sequence's log-probability under the frozen base
alone: colocated_losses computes those once per distinct sequence (one adapter-free forward of the
sequences not seen before) and keeps them there, shared by every adapter that trains on them.

To add an objective: one class here (its name, per_sample, loss_sums; references if it needs the
base's log-probabilities), listed in OBJECTIVES, its name in alto.tasks.OBJECTIVES.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from alto.loss import adapter_loss_sums, next_token_targets
from alto.model import StepPlan
from alto_ext.segments import segment_sums, to_device


class Objective:
    """The interface (see the module docstring)."""

    name: ClassVar[str]
    per_sample: ClassVar[int]  # sequences in one sample, kept together
    metrics: ClassVar[tuple[str, ...]] = ()  # held-out figures beside the loss (a task's eval.metric may name one)
    references: "ReferenceLogProbs | None" = None  # the base's log-probabilities, if the loss needs them
    next_token_loss: ClassVar[bool] = False  # its loss is a mean next-token loss: it has a perplexity, and
    # adapters' losses compare (else each adapter's own settings shape its loss: its task's metric ranks them)

    def loss_sums(self, token_loss: torch.Tensor, labels: torch.Tensor, plan: StepPlan,
                  reference: torch.Tensor | None = None) -> torch.Tensor:
        """[2 + len(metrics), G] in the plan's adapter order: each adapter's summed loss and the
        count its mean divides by (then each metric's sum over the same count), from every
        position's next-token loss (flat, 0 where there is no target), the step's [rows, positions]
        labels (-100: no target) and, if the objective has references, each sequence's summed
        log-probability under the base alone ([sequences], step order)."""
        raise NotImplementedError


class SFT(Objective):
    """Supervised fine-tuning as TRL's SFTTrainer does it: each adapter's mean next-token loss over
    its own target tokens (completion-only: context tokens carry no target, alto.data)."""

    name, per_sample, next_token_loss = "sft", 1, True

    def loss_sums(self, token_loss: torch.Tensor, labels: torch.Tensor, plan: StepPlan,
                  reference: torch.Tensor | None = None) -> torch.Tensor:
        return adapter_loss_sums(token_loss, labels, plan.token_counts, plan.sum_index(), plan.sum_width)


class ReferenceLogProbs:
    """Each distinct sequence's summed log-probability under the frozen base, computed once (by
    alto.step.colocated_losses) and kept for the run, by a 16-byte digest of its tokens and whether
    a training step (autocast on CUDA) or a held-out pass scored it. forwards and computed count
    the base's passes and the sequences they scored (what sharing saves is measured by them)."""

    def __init__(self) -> None:
        self.values: dict[tuple[bytes, bool], float] = {}
        self.forwards = self.computed = 0

    @staticmethod
    def key(sequence: Sequence[int] | torch.Tensor, training: bool) -> tuple[bytes, bool]:
        tokens = torch.as_tensor(sequence, dtype=torch.int64).numpy().tobytes()
        return hashlib.blake2b(tokens, digest_size=16).digest(), training

    def missing(self, sequences: Sequence[Sequence[int] | torch.Tensor], training: bool) -> list:
        """The sequences not scored yet (in this mode), each once."""
        out: dict[tuple[bytes, bool], Sequence[int] | torch.Tensor] = {}
        for s in sequences:
            k = self.key(s, training)
            if k not in self.values:
                out.setdefault(k, s)
        return list(out.values())

    def add(self, sequences: Sequence[Sequence[int] | torch.Tensor], training: bool, log_probs: Sequence[float]) -> None:
        self.forwards += 1
        self.computed += len(sequences)
        self.values.update(zip((self.key(s, training) for s in sequences), log_probs))

    def of(self, sequences: Sequence[Sequence[int] | torch.Tensor], training: bool, dtype: torch.dtype,
           device: torch.device) -> torch.Tensor:
        return to_device([self.values[self.key(s, training)] for s in sequences], device, dtype)


def sequence_sums(values: torch.Tensor, lengths: Sequence[int], row_len: int | None) -> torch.Tensor:
    """[..., sequences]: flat per-position values summed over each sequence of a step of sequences
    of these lengths (its positions: packed, row_len None, its length; padded, its row)."""
    return segment_sums(values, lengths if row_len is None else [row_len] * len(lengths))


class DPO(Objective):
    """Direct preference optimization as TRL's DPOTrainer computes it with a LoRA adapter: a sample
    is a pair (chosen, rejected); each answer's log-probability is the sum over its completion
    tokens, its log-ratio that minus the frozen base's (the reference: the model with no adapter);
    per pair, with the adapter's beta and loss_type,
      sigmoid: -log sigmoid(beta * (chosen log-ratio - rejected log-ratio))
      ipo:     (chosen log-ratio / its tokens - rejected log-ratio / its tokens - 1 / (2 beta))^2
    and an adapter's loss is the mean over its pairs. Its metrics (TRL's rewards/accuracies and
    rewards/margins, a reward being beta x an answer's log-ratio): the share of pairs whose chosen
    reward is above the rejected one's, and the mean margin between them."""

    name, per_sample, metrics = "dpo", 2, ("reward_accuracy", "reward_margin")

    def __init__(self) -> None:
        self.references = ReferenceLogProbs()

    def loss_sums(self, token_loss: torch.Tensor, labels: torch.Tensor, plan: StepPlan,
                  reference: torch.Tensor | None = None) -> torch.Tensor:
        if reference is None:
            raise ValueError("dpo needs the base's log-probabilities of the step's sequences")
        has_target = (next_token_targets(labels) != -100).to(token_loss.dtype)
        lengths = [n for lens in plan.lengths for n in lens]
        loss_sum, tokens = sequence_sums(torch.stack([token_loss.flatten(), has_target]), lengths, plan.row_len)
        ratio = -loss_sum - reference
        pairs = [len(lens) // 2 for lens in plan.lengths]
        per_pair = [(c.beta, c.loss_type == "ipo") for c, n in zip(plan.configs, pairs) for _ in range(n)]
        beta = to_device([b for b, _ in per_pair], ratio.device, ratio.dtype)
        ipo = to_device([i for _, i in per_pair], ratio.device, torch.bool)
        chosen, rejected = ratio[0::2], ratio[1::2]
        sigmoid_loss = -F.logsigmoid(beta * (chosen - rejected))
        ipo_loss = (chosen / tokens[0::2].clamp_min(1) - rejected / tokens[1::2].clamp_min(1) - 1 / (2 * beta)) ** 2
        loss = torch.where(ipo, ipo_loss, sigmoid_loss)
        margin = (beta * (chosen - rejected)).detach()
        return segment_sums(torch.stack([loss, torch.ones_like(loss), (margin > 0).to(loss.dtype), margin]), pairs)


OBJECTIVES: dict[str, type[Objective]] = {o.name: o for o in (SFT, DPO)}
