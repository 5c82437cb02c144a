"""Objectives: what a sample of an adapter's data is, and how each adapter's loss comes from a
co-located step's per-token losses.

A step (alto.train.colocated_losses: training, held-out losses and admission's probe steps alike)
runs every adapter's samples through the shared model and its LM head once, giving every
position's next-token loss (the negative log-probability of its target; alto.loss); the objective
reduces those to each adapter's summed loss and the count its mean divides by. A sample is
`per_sample` sequences taken together: data streams serve whole samples and held-out passes never
split one (a preference pair's chosen and rejected answers must meet in one step of one adapter).

To add an objective: one class here (its per_sample and loss_sums), listed in OBJECTIVES. DPO is
next: a sample of two sequences (chosen, rejected); its loss per pair from their summed
log-probabilities and those of the frozen base.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from alto.loss import adapter_loss_sums
from alto.model import StepPlan


class Objective:
    """The interface (see the module docstring)."""

    name: ClassVar[str]
    per_sample: ClassVar[int]  # sequences in one sample, kept together

    def loss_sums(self, token_loss: torch.Tensor, labels: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """[2, G] in the plan's adapter order: each adapter's summed loss and the count its mean
        divides by, from every position's next-token loss (flat, 0 where there is no target) and
        the step's [rows, positions] labels (-100: no target)."""
        raise NotImplementedError


class SFT(Objective):
    """Supervised fine-tuning as TRL's SFTTrainer does it: each adapter's mean next-token loss over
    its own target tokens (completion-only: context tokens carry no target, alto.data)."""

    name, per_sample = "sft", 1

    def loss_sums(self, token_loss: torch.Tensor, labels: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        return adapter_loss_sums(token_loss, labels, plan.token_counts)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (SFT(),)}
