"""One co-located pass (training steps, held-out losses and admission's probes alike): the step's
inputs built from every adapter's sequences (packed end to end, or right-padded rows), one forward
of the shared model with each adapter on its own tokens, every position's next-token loss, and
each adapter's loss as its objective says (alto.objectives), with the frozen base's scores of new
sequences first where the objective needs them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alto.data import ids_and_labels
from alto.loss import head_token_losses, target_positions, token_losses
from alto.model import MultiLoraModel, StepPlan, plan_for
from alto.objectives import SFT, Objective, sequence_sums
from alto.shared_prefixes import SharedPrefixes, shared_lengths
from alto.step_buckets import Padding, padded_rows
from alto_ext.segments import to_device


def pad_batch(sequences: Sequence[Sequence[int] | torch.Tensor], pad_id: int):
    """Right-padded input_ids, attention_mask and labels (-100 on padding and context-only tokens:
    alto.data) as [B, L] tensors. All tokens in one tensor, scattered by a length mask. Token
    lists are converted element by element (3.4 ms for 32 x 512 tokens on our CPU); DataStream's
    tensors are just copied."""
    lengths = torch.tensor([len(s) for s in sequences])
    L = int(lengths.max())
    mask = torch.arange(L) < lengths[:, None]
    ids, labels = torch.full((len(sequences), L), pad_id, dtype=torch.long), torch.full((len(sequences), L), -100)
    ids[mask], labels[mask] = ids_and_labels(torch.cat([torch.as_tensor(s, dtype=torch.long) for s in sequences]))
    return ids, mask.long(), labels


def step_inputs(sequences: Sequence[Sequence[int] | torch.Tensor], pad_id: int, packed: bool,
                device: torch.device, position_offsets: torch.Tensor | None = None, padding: Padding | None = None
                ) -> tuple[dict[str, torch.Tensor | int], torch.Tensor, int | None]:
    """(model inputs on `device`, labels [rows, positions] on the host, row length or None) of a
    step's sequences: the caller reads the labels' target positions there and sends them (no wait
    for the GPU). Padded: right-padded rows with an attention mask. Packed (TRL's padding-free
    layout): one row of all sequences end to end, position ids restarting at each (plus
    position_offsets, one per token: where the sequences continue shared prefixes), the boundaries
    as cu_seq_lens_q, and each sequence's first label -100, so no next-token target crosses a
    boundary. padding (packed only): the stream padded to its bucket (alto.step_buckets)."""
    if not packed:
        ids, mask, labels = pad_batch(sequences, pad_id)
        return {"input_ids": to_device(ids, device), "attention_mask": to_device(mask, device)}, labels, ids.shape[1]
    pads = [] if padding is None else [torch.full((n,), pad_id) for n in padding.sequences]
    lengths = torch.tensor([len(s) for s in [*sequences, *pads]])
    ids, labels = ids_and_labels(torch.cat([torch.as_tensor(s, dtype=torch.long) for s in [*sequences, *pads]]))
    bounds = F.pad(lengths.cumsum(0), (1, 0))
    positions = torch.arange(len(ids)) - bounds[:-1].repeat_interleave(lengths)
    if position_offsets is not None:
        positions += position_offsets
    labels[bounds[:-1]] = -100
    max_length = int(lengths.max())
    if padding is not None:
        labels[len(ids) - sum(padding.sequences):] = -100
        bounds = F.pad(bounds, (0, padding.empty), value=len(ids))
        max_length = padding.max_length
    inputs = {"input_ids": to_device(ids[None], device), "position_ids": to_device(positions[None], device),
              "cu_seq_lens_q": to_device(bounds.to(torch.int32), device), "max_length_q": max_length}
    return inputs, labels[None], None


def colocated_losses(model: MultiLoraModel, batches: dict[str, Sequence[Sequence[int] | torch.Tensor]],
                     pad_id: int, device: torch.device, training: bool, packed: bool = True,
                     objective: Objective = SFT()) -> torch.Tensor:
    """The one place a co-located batch is built and run (training steps, held-out losses and
    admission's probes alike): every adapter's sequences (whole samples of the objective), packed
    into one token stream (or as right-padded rows), one forward of the shared model, the
    per-token losses (alto.loss: the LM head only at positions with a target, fused with the loss
    on CUDA); returns the objective's loss_sums ([2 + its metrics, G] in batches' order). An objective with
    references first has the sequences the base has not scored yet scored by it (reference_scores).
    Autocast is chosen here: training on CUDA runs in bf16 (adapter masters stay fp32); held-out
    losses run in the base's own dtype (as PEFT evaluates it), and nothing autocasts on the CPU
    (float32, or float64 for exact checks). Packed, the adapters' common context prefixes are
    computed once (alto.shared_prefixes). A training step runs the same parts (alto.train: a
    repeated one as a CUDA graph, alto.step_graphs)."""
    flat = [s for b in batches.values() for s in b]
    reference = reference_scores(model, objective, flat, pad_id, device, training, packed)
    step = prepare_pass(model, batches, flat, pad_id, device, training, packed)
    return objective.loss_sums(run_pass(model, step), step.labels, step.plan, reference)


def reference_scores(model: MultiLoraModel, objective: Objective, flat: Sequence, pad_id: int, device: torch.device,
                     training: bool, packed: bool) -> torch.Tensor | None:
    """Each sequence's summed log-probability under the frozen base ([sequences]) where the
    objective has references (None otherwise): the sequences it has not scored yet are scored now,
    in one forward with no adapter and no gradient."""
    if (references := objective.references) is None:
        return None
    if new := references.missing(flat, training):
        modes = [(m, m.training) for m in model.modules()]
        model.eval()  # the base's own dropout off: a reference is kept for the run (TRL turns it off too)
        try:
            with torch.no_grad():
                token_loss, labels, plan = forward_token_losses(model, {}, new, pad_id, device, training, packed)
                sums = sequence_sums(token_loss.flatten(), [len(s) for s in new], plan.row_len)
            references.add(new, training, (-sums).tolist())
        finally:
            for module, mode in modes:
                module.training = mode
    return references.of(flat, training, model.adapter_dtype, device)


@dataclass
class Pass:
    """One forward's inputs, on the device (prepare_pass): what run_pass computes from. Built on the
    host from the sequences; nothing in it is read back to the host."""

    plan: StepPlan
    inputs: dict[str, torch.Tensor | int | SharedPrefixes]  # the model's keyword inputs (step_inputs')
    labels: torch.Tensor  # [rows, positions], -100: no target
    rows: torch.Tensor | None  # target_positions(labels), where the model has a plain head
    training: bool


def prepare_pass(model: MultiLoraModel, batches: dict[str, Sequence], flat: Sequence, pad_id: int,
                 device: torch.device, training: bool, packed: bool, bucketed: bool = False) -> Pass:
    """The pass of the sequences flat (batches' in order; no batches: the base alone, as an
    objective's reference pass and bench_step's frozen-base step run it, with the head and layout of
    a co-located step). Bucketed, a packed pass of adapters runs every sequence whole, padded to its
    bucket (alto.step_buckets: the pad sequences the last adapter's). Else, where the adapters'
    sequences share context prefixes, each prefix runs once (alto.shared_prefixes: the labels and plan
    are of the rows the pass runs, each adapter's first sequence whole and the others' own tokens)."""
    padded = bucketed and packed and bool(batches)
    # a padded step is small, the host's: sharing saves GPU work it does not wait for, and the step's own
    # gather index would keep it from a graph
    shared = None if padded else shared_prefix_lengths(model, batches, training, packed)
    prefixes = None if shared is None else SharedPrefixes.of(batches, shared, device)
    runs = batches if prefixes is None else prefixes.runs(batches)
    seqs = flat if prefixes is None else [s for b in runs.values() for s in b]
    padding = Padding.of([len(s) for s in seqs]) if padded else None
    inputs, labels, row_len = step_inputs(seqs, pad_id, packed, device,
                                          None if prefixes is None else prefixes.position_offsets, padding)
    if prefixes is not None:
        inputs["shared_prefixes"] = prefixes
    lengths = [[len(s) for s in b] for b in runs.values()]
    if padding is not None:
        lengths[-1] += padding.sequences
    plan = plan_for(model, list(runs), lengths, row_len, device, bucketed=padding is not None)
    # the head runs on the positions with a target only: read on the host, where step_inputs built
    # the labels (a GPU's .nonzero() would wait for it)
    rows = None
    if model.plain_head is not None:
        rows = target_positions(labels.cpu())
        rows = to_device(rows if padding is None else padded_rows(rows, padding.positions), device)
    return Pass(plan, inputs, to_device(labels, device), rows, training)


def run_pass(model: MultiLoraModel, step: Pass) -> torch.Tensor:
    """Every position's next-token loss of the pass, flat (fp32; float64 for a float64 model), in
    the graph of the adapters' weights where they train."""
    head = model.plain_head  # where the logits are head(hidden)
    # autocast's cast cache is off while a CUDA graph is captured (torch.cuda.graphs asks it)
    cache = not (step.plan.device.type == "cuda" and torch.cuda.is_current_stream_capturing())
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=step.training and step.plan.device.type == "cuda",
                        cache_enabled=cache):
        out = model(step.plan, last_hidden=head is not None, **step.inputs)
        if head is not None:  # its logits under the step's autocast, as the model's own head's would be
            return head_token_losses(out, head, step.labels, step.rows)
    return token_losses(out, step.labels)


def forward_token_losses(model: MultiLoraModel, batches: dict[str, Sequence], flat: Sequence, pad_id: int,
                         device: torch.device, training: bool, packed: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, StepPlan]:
    """(every position's next-token loss, the labels, the plan) of one pass of the sequences flat
    (prepare_pass, then run_pass)."""
    step = prepare_pass(model, batches, flat, pad_id, device, training, packed)
    return run_pass(model, step), step.labels, step.plan


def shared_prefix_lengths(model: MultiLoraModel, batches: dict[str, Sequence], training: bool,
                          packed: bool) -> list[int] | None:
    """Positions each adapter's sequences share in a packed pass of these batches
    (alto.shared_prefixes), or None where it shares none: also where the base's own dropout draws
    masks in training. In training an adapter with LoRA dropout shares none: PEFT draws its masks
    for every sequence's tokens."""
    if not (packed and batches):
        return None
    if training and model.base_dropout:
        return None
    return shared_lengths(batches, alone={a for a in batches if training and model.configs[a].dropout > 0})


def step_positions(lengths: Sequence[int], packed: bool) -> int:
    """Token positions a step of sequences of these lengths runs (padded: every row as long as the longest)."""
    return sum(lengths) if packed else len(lengths) * max(lengths, default=0)
