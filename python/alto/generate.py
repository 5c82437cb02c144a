"""Greedy decoding with co-located adapters: the held-out prompts of every adapter in one batch of
rows (each row one adapter's, the adapters' rows in blocks), decoded together with a key/value cache.
The segmented LoRA ops serve decoding as they serve training: a step's plan gives each adapter its
rows' token positions.

The prompts are read (prefilled) packed, as held-out passes run (alto.shared_prefixes): each
adapter's common prefix once (a chat template's system prompt) with every prompt's own tokens,
no padding; their keys and values then fill a left-padded cache (every row's next token at the
same column) for the decoding steps. A model that cannot run packed steps reads them as
left-padded rows. A row that has reached a stop token leaves the batch (and its cache): the
later steps compute only the rows still decoding.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch

from alto.data import context
from alto.model import MultiLoraModel, plan_for
from alto.shared_prefixes import SharedPrefixes
from alto.step import shared_prefix_lengths, step_inputs

Prompts = Mapping[str, Sequence[Sequence[int]]]


def _padded_prefill(model: MultiLoraModel, prompts: Prompts, pad_id: int, device: torch.device):
    """(each prompt's next-token logits [rows, vocab], the cache, the left-padded attention mask)
    from the prompts as left-padded rows."""
    from transformers import DynamicCache

    rows = [p for ps in prompts.values() for p in ps]
    width = max(len(p) for p in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, p in enumerate(rows):  # left-padded: every row's next token is at the same column
        ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    plan = plan_for(model, list(prompts), [[width] * len(ps) for ps in prompts.values()], width, device)
    cache = DynamicCache()
    logits = model(plan, input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                   past_key_values=cache, logits_to_keep=1)  # the prompts' other positions skip the LM head
    return logits[:, -1], cache, mask


def _packed_prefill(model: MultiLoraModel, prompts: Prompts, pad_id: int, device: torch.device):
    """As _padded_prefill, the prompts read packed (each adapter's shared prefix once); the cache
    built from the keys and values of every whole prompt."""
    from transformers import DynamicCache

    batches = {aid: [context(p) for p in ps] for aid, ps in prompts.items()}  # no targets: any common prefix is shared
    shared = shared_prefix_lengths(model, batches, training=False, packed=True)
    prefixes = SharedPrefixes.of(batches, shared or [0] * len(batches), device)
    prefixes.keep_whole = True
    runs = prefixes.runs(batches)
    flat = [s for ps in runs.values() for s in ps]
    inputs, _, _ = step_inputs(flat, pad_id, True, device, prefixes.position_offsets)
    plan = plan_for(model, list(runs), [[len(s) for s in ps] for ps in runs.values()], None, device)
    last = torch.tensor([len(s) for s in flat]).cumsum(0) - 1
    logits = model(plan, logits_to_keep=last.to(device), shared_prefixes=prefixes, **inputs)[0]
    lengths = torch.tensor([n for ns in prefixes.lengths for n in ns])
    width = int(lengths.max())
    # each whole prompt's position j at column width - length + j of its row
    starts = torch.arange(len(lengths)) * width + width - lengths
    dest = (starts.repeat_interleave(lengths) + torch.arange(int(lengths.sum()))
            - (lengths.cumsum(0) - lengths).repeat_interleave(lengths)).to(device)
    cache = DynamicCache()
    for layer in sorted(prefixes.whole):  # [tokens, heads, dim] -> [rows, heads, width, dim], one layer at a time
        k, v = (t.new_zeros(len(lengths) * width, *t.shape[1:]).index_copy_(0, dest, t)
                .view(len(lengths), width, *t.shape[1:]).transpose(1, 2) for t in prefixes.whole.pop(layer))
        cache.update(k, v, layer)
    mask = (torch.arange(width) >= width - lengths[:, None]).long().to(device)
    return logits, cache, mask


def _batch(model: MultiLoraModel, prompts: Prompts, max_new_tokens: int, stop_ids: Collection[int], pad_id: int,
           device: torch.device, packed: bool) -> list[list[int]]:
    logits, cache, mask = (_packed_prefill if packed else _padded_prefill)(model, prompts, pad_id, device)
    positions = mask.sum(-1, keepdim=True)  # the next token's: each prompt's length
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    adapters = list(prompts)
    owner = torch.tensor([i for i, ps in enumerate(prompts.values()) for _ in ps])  # each row's adapter
    live = torch.arange(len(mask))  # the rows still decoding (a finished row leaves the batch, its cache too)
    out = []
    for step in range(max_new_tokens):
        rows = live.to(device)
        token = torch.full((len(owner),), pad_id, dtype=torch.long, device=device)
        token[rows] = logits.argmax(-1)
        out.append(token)
        going = ~torch.isin(token[rows], stop)
        left = int(going.sum())  # the step's one wait
        if step + 1 == max_new_tokens or left == 0:
            break
        if left < len(live):
            keep = going.nonzero().squeeze(1)
            live, rows, mask, positions = live[keep.cpu()], rows[keep], mask[keep], positions[keep]
            cache.batch_select_indices(keep)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        counts = torch.bincount(owner[live], minlength=len(adapters)).tolist()
        plan = plan_for(model, [a for a, n in zip(adapters, counts) if n], [[1] * n for n in counts if n], 1, device)
        logits = model(plan, input_ids=token[rows][:, None], attention_mask=mask, position_ids=positions,
                       past_key_values=cache, logits_to_keep=1)[:, -1]
        positions = positions + 1
    tokens = torch.stack(out, dim=1).tolist()
    return [row[: next((j for j, t in enumerate(row) if t in stop_ids), len(row))] for row in tokens]


def greedy_completions(model: MultiLoraModel, prompts: Prompts, max_new_tokens: int, stop_ids: Collection[int],
                       pad_id: int, device: torch.device, max_positions: int,
                       packed: bool = True) -> dict[str, list[list[int]]]:
    """Each adapter's greedy completion of each of its prompts (token ids, without the stop token),
    decoded co-located in batches of at most max_positions prompt + completion positions. The
    adapters must be in the model; run it in eval mode without gradients (alto.evaluation.evaluating).
    packed: the prompts read packed (else as left-padded rows: models packed steps cannot run)."""
    per_row = max((len(p) for ps in prompts.values() for p in ps), default=0) + max_new_tokens
    rows_per_batch = max(1, max_positions // max(1, per_row))
    work = [(aid, p) for aid, ps in prompts.items() for p in ps]
    done: dict[str, list[list[int]]] = {aid: [] for aid in prompts}
    for i in range(0, len(work), rows_per_batch):
        chunk: dict[str, list[Sequence[int]]] = {}
        for aid, p in work[i : i + rows_per_batch]:
            chunk.setdefault(aid, []).append(p)
        completions = iter(_batch(model, chunk, max_new_tokens, stop_ids, pad_id, device, packed))
        for aid, ps in chunk.items():
            done[aid] += [next(completions) for _ in ps]
    return done
