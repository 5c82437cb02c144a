"""Co-locating as many adapters as the GPU holds: sweeps of 8..128 configurations run through the
`alto tune` code path (alto.sweep.parse_sweep + alto.sweep_run.SweepRun.run, the run minus the final
PEFT export), with `max_running: auto` (admission by the measured memory model), packed and padded.

Configurations: ranks 8/16/32/64 x micro-batches 1/2/4 (cycled), q/k/v/o projections, --steps
optimizer steps each; data: byte-tokenized random text of 128-512 tokens. Bases: Llama-3.2-1B
widths (16 layers, vocab 128256) and Llama-3-8B widths (4 layers), random bf16 weights (the base's
dtype on a GPU). From each run's steps.csv: tokens/s (real tokens, padding excluded, over the
seconds of the steps after the first WARM_UP), padding fraction, the most adapters co-located, the
measured and predicted peak memory vs the device's; whether every adapter finished. A last row
starts the 1B sweep too large on purpose (max_running = every configuration, no admission):
out-of-memory steps are undone and split.
Rows per --quantize (none: bf16; nf4: QLoRA's 4-bit projections) and, with --shard, over the sharded
base (FSDP2; on one GPU a process group of one: the code path of shard_base, not its memory saving).
Run on the GPU: python bench/bench_memory.py [--counts 8 16 ...] [--widths 1b 8b] [--layers 32]
[--quantize none nf4] [--shard] [--padded] [--too-large 0]
(a CPU smoke run, fp32 and admitted by the CPU's estimate: --device cpu --widths tiny --counts 2 --padded --too-large 0)
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from alto.base import model_bytes
from alto.parallel import Group
from alto.registry import Status
from alto.sweep import parse_sweep
from alto.sweep_run import SweepRun

WIDTHS = {
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 1024},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 4, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 1024},
    # Qwen2.5-7B's (issue 29's second sweep runs 4 of its 28 layers: --layers 4), as a Llama: no q/k/v biases
    "qwen7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
               "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 152064, "max_position_embeddings": 1024},
    # SmolLM2-135M's (its 30 layers: a model whose step is launch-bound on an H200)
    "smollm2": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 2048,
                "tie_word_embeddings": True},
    # the benches' smoke runs on a CPU (tests/test_bench.py)
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 600},
}


WARM_UP = 3


def write_data(path: Path, n: int = 3000) -> None:
    rng = random.Random(0)
    letters = "abcdefghij klmnopqrst uvwxyz"
    path.write_text("\n".join(json.dumps({"text": "".join(rng.choice(letters) for _ in range(rng.randrange(127, 512)))})
                              for _ in range(n)))


def sweep_text(widths: str, count: int, data: Path, out: Path, packing: bool, max_running: int | str,
               steps: int = 3, layers: int = 0, quantize: str = "none", shard: bool = False,
               device: str = "cuda") -> str:
    adapters = [{"id": f"c{i}", "rank": (8, 16, 32, 64)[i % 4], "micro_batch_size": (1, 2, 4)[i % 3],
                 "lr": 1e-4 * (1 + i % 5), "seed": i} for i in range(count)]
    model = {**WIDTHS[widths], **({"num_hidden_layers": layers} if layers else {})}
    return json.dumps({
        "name": "bench", "model": {"random_llama": model}, "device": device, "checkpoint_every": 10**6,
        "output": str(out), "data": {"source": "jsonl", "path": str(data), "max_length": 512, "eval_fraction": 0.0},
        "defaults": {"max_steps": steps, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "adapters": adapters, "max_running": max_running, "packing": packing, "base": {"quantize": quantize},
        "shard_base": shard})


def step_figures(steps_csv: Path) -> tuple[list[dict], dict]:
    """A run's steps.csv and its figures: tokens/s of the trained steps after the first WARM_UP
    (allocator growth, first-use initializations: measured 3x slower), padding excluded; peaks."""
    with open(steps_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    timed = [r for r in rows[WARM_UP:] if r["out_of_memory"] == "0"] or rows
    seconds = sum(float(r["seconds"]) for r in timed)
    positions = sum(int(r["token_positions"]) for r in timed)
    tokens = sum(int(r["token_positions"]) * (1 - float(r["padding_fraction"])) for r in timed)
    peaks = [float(r["measured_peak_gb"]) for r in rows if r["measured_peak_gb"]]
    predicted = [float(r["predicted_peak_gb"]) for r in rows if r["predicted_peak_gb"]]
    return rows, {"steps": len(rows), "ooms": sum(r["out_of_memory"] == "1" for r in rows),
                  "most_colocated": max(int(r["adapters"]) for r in rows), "tokens_per_s": tokens / seconds,
                  "step_s": seconds / len(timed), "padding": 1 - tokens / positions,
                  "peak_gb": max(peaks, default=float("nan")), "predicted_gb": max(predicted, default=float("nan"))}


def run_one(widths: str, count: int, packing: bool, data: Path, root: Path, max_running: int | str = "auto",
            steps: int = 3, layers: int = 0, quantize: str = "none", shard: bool = False,
            device: str = "cuda") -> dict:
    out = root / f"{widths}-{layers}-{count}-{'packed' if packing else 'padded'}-{max_running}-{quantize}-{shard}"
    out.mkdir(parents=True)
    sweep = parse_sweep(sweep_text(widths, count, data, out, packing, max_running, steps, layers, quantize, shard,
                                   device))
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # shard_base on one GPU: the sharded code path (FSDP2 over a process group of one), as alto tune runs it
    group = Group.from_env(device, process_group=shard)
    try:
        start = time.time()
        run = SweepRun(sweep, out, group)
        calibrated = time.time() - start
        base_gb = model_bytes(run.base.model) / 1e9
        run.run(log=lambda *_: None)
        wall = time.time() - start
        run.checkpoints.discard()  # the final checkpoint's background write stopped, as finish() does: out goes next
        if run.exports is not None:  # and the exports started as adapters ended (no finish(): not written here)
            run.exports.close()
    finally:
        group.close()
    summary = step_figures(out / "steps.csv")[1]
    statuses = [a.status for a in run.registry]
    device_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if device == "cuda" else float("nan")
    result = {
        "widths": f"{widths} ({layers or WIDTHS[widths]['num_hidden_layers']} layers)", "base": quantize,
        "sharded": shard, "base_gb": base_gb, "configs": count, "layout": "packed" if packing else "padded",
        "max_running": max_running,
        "finished": sum(s == Status.FINISHED for s in statuses), "failed": sum(s == Status.FAILED for s in statuses),
        **summary, "device_gb": device_gb, "calibrate_s": calibrated,
        "wall_s": wall}
    del run
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    ap.add_argument("--widths", nargs="+", default=["1b", "8b"], choices=list(WIDTHS))
    ap.add_argument("--padded", type=int, nargs="*", default=[16, 64], help="counts also run padded")
    ap.add_argument("--too-large", type=int, default=128, help="1B sweep started with max_running = this (0: skip)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers of every base (0: the widths' own)")
    ap.add_argument("--quantize", nargs="+", default=["none"], choices=["none", "nf4"], help="base.quantize of each row")
    ap.add_argument("--shard", action="store_true", help="also rows with shard_base: true (one GPU: world size 1)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    where, dtype = (torch.cuda.get_device_name(), "bf16") if args.device == "cuda" else ("cpu", "fp32")
    print(f"device: {where}  torch {torch.__version__}; {dtype} random bases; "
          f"ranks 8-64, micro-batches 1/2/4, q/k/v/o, {args.steps} steps each, 128-512-token sequences\n")
    from alto.attention import _varlen_attn

    flash = args.device == "cuda" and _varlen_attn()  # alto.attention: SDPA per sequence on the CPU
    print(f"varlen attention: {'torch FlashAttention varlen' if flash else 'per-sequence SDPA'}\n")
    cols = ["widths", "base", "sharded", "base_gb", "configs", "layout", "max_running", "finished", "failed", "steps", "ooms", "most_colocated",
            "step_s", "tokens_per_s", "padding", "peak_gb", "predicted_gb", "device_gb", "calibrate_s", "wall_s"]
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data.jsonl"
        write_data(data)
        plan = [(w, n, True, "auto", q, False) for w in args.widths for q in args.quantize for n in args.counts]
        plan += [(w, n, True, "auto", "none", True) for w in args.widths for n in args.counts if args.shard]  # nf4: 2+ ranks
        plan += [(w, n, False, "auto", "none", False) for w in args.widths[:1] for n in args.padded]
        if args.too_large:
            plan.append((args.widths[0], args.too_large, True, args.too_large, "none", False))
        for widths, count, packing, max_running, quantize, shard in plan:
            r = run_one(widths, count, packing, data, root, max_running, args.steps, args.layers, quantize, shard,
                        args.device)
            print(" | ".join(f"{r[c]:,.0f}" if c == "tokens_per_s" else f"{r[c]:.3g}" if isinstance(r[c], float)
                             else str(r[c]) for c in cols), flush=True)


if __name__ == "__main__":
    main()
