"""Greedy decoding with co-located adapters: the held-out prompts of every adapter in one batch of
left-padded rows (each row one adapter's, the adapters' rows in blocks), decoded together with a
key/value cache. The segmented LoRA ops serve decoding as they serve training: a step's plan gives
each adapter its rows' token positions (the prompt positions first, then one per row and token)."""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch

from alto.model import MultiLoraModel, plan_for


def _batch(model: MultiLoraModel, prompts: Mapping[str, Sequence[Sequence[int]]], max_new_tokens: int,
           stop_ids: Collection[int], pad_id: int, device: torch.device) -> list[list[int]]:
    from transformers import DynamicCache

    rows = [p for ps in prompts.values() for p in ps]
    width = max(len(p) for p in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, p in enumerate(rows):  # left-padded: every row's next token is at the same column
        ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    counts = [len(ps) for ps in prompts.values()]
    cache = DynamicCache()
    out, done = [], torch.zeros(len(rows), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        plan = plan_for(model, list(prompts), [[ids.shape[1]] * n for n in counts], ids.shape[1], device)
        # the next token's logits only: the prompt's other positions skip the LM head
        logits = model(plan, input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       logits_to_keep=1)
        token = torch.where(done, pad_id, logits[:, -1].argmax(-1))
        out.append(token)
        done |= torch.isin(token, stop)
        if bool(done.all()):
            break
        ids, positions = token[:, None], positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    tokens = torch.stack(out, dim=1).tolist()
    return [row[: next((j for j, t in enumerate(row) if t in stop_ids), len(row))] for row in tokens]


def greedy_completions(model: MultiLoraModel, prompts: Mapping[str, Sequence[Sequence[int]]], max_new_tokens: int,
                       stop_ids: Collection[int], pad_id: int, device: torch.device,
                       max_positions: int) -> dict[str, list[list[int]]]:
    """Each adapter's greedy completion of each of its prompts (token ids, without the stop token),
    decoded co-located in batches of at most max_positions prompt + completion positions. The
    adapters must be in the model; run it in eval mode without gradients (alto.evaluation.evaluating)."""
    per_row = max((len(p) for ps in prompts.values() for p in ps), default=0) + max_new_tokens
    rows_per_batch = max(1, max_positions // max(1, per_row))
    work = [(aid, p) for aid, ps in prompts.items() for p in ps]
    done: dict[str, list[list[int]]] = {aid: [] for aid in prompts}
    for i in range(0, len(work), rows_per_batch):
        chunk: dict[str, list[Sequence[int]]] = {}
        for aid, p in work[i : i + rows_per_batch]:
            chunk.setdefault(aid, []).append(p)
        completions = iter(_batch(model, chunk, max_new_tokens, stop_ids, pad_id, device))
        for aid, ps in chunk.items():
            done[aid] += [next(completions) for _ in ps]
    return done
