"""Tenants sharing one base: a multi-task sweep (every task's adapters co-located in the same steps,
admitted by memory) against the same tasks run as separate sweeps one after another (one job per
tenant, as users run them today), both through the `alto tune` code path (parse_sweep, SweepRun.run,
SweepRun.finish: the final held-out evaluation, greedy decoding for the metric and the PEFT exports).

Tasks: prompt/completion JSONL of byte-tokenized random text, of different lengths per task (short
64-128, medium 128-256, long 256-512 tokens); each task a grid of rank 8/16 x lr 1e-4/3e-4 on q/k/v/o,
held-out loss every 10 micro-steps on 32 sequences (best weights kept), exact match of 16 greedy
tokens on the short task. Base: Llama-3.2-1B widths (bench_memory.WIDTHS), random bf16 weights.
A 2-step sweep runs first, untimed (CUDA's and the kernels' first uses). Printed: setup seconds
(base loading, data, calibration), training seconds (steps and evaluations), finish seconds, wall, tokens/s
of the training steps (bench_memory.step_figures), the most adapters co-located, the peak memory,
the seconds of SweepRun.finish, and each task's best held-out loss and metric.
Run on the GPU: python bench/bench_tasks.py [--steps 30] [--widths 1b]
(a CPU smoke run, fp32 and no peak memory: --device cpu --widths tiny --steps 2 --max-length 128 --eval-samples 4)
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

from alto.sweep import parse_sweep
from alto.sweep_run import SweepRun
from bench_memory import WIDTHS, step_figures

TASKS = {"short": (64, 128), "medium": (128, 256), "long": (256, 512)}


def write_task_data(root: Path, name: str, lengths: tuple[int, int], n: int = 800) -> Path:
    rng = random.Random(name)
    letters = "abcdefghij klmnopqrst uvwxyz"
    path = root / f"{name}.jsonl"
    with open(path, "w") as f:
        for _ in range(n):
            total = rng.randrange(*lengths)
            cut = rng.randrange(total // 4, total // 2)
            text = "".join(rng.choice(letters) for _ in range(total))
            f.write(json.dumps({"prompt": text[:cut], "completion": text[cut:]}) + "\n")
    return path


def task_entry(name: str, data: Path, max_length: int, samples: int) -> dict:
    entry = {"name": name, "data": {"source": "jsonl", "path": str(data), "max_length": max_length, "eval_fraction": 0.05},
             "grid": {"rank": [8, 16], "lr": [1e-4, 3e-4]}}
    if name == "short":
        entry["eval"] = {"every": 10, "samples": samples, "metric": "exact_match", "max_new_tokens": 16}
    return entry


def sweep(widths: str, tasks: list[dict], out: Path, steps: int, samples: int, device: str) -> str:
    return json.dumps({
        "name": "bench-tasks", "model": {"random_llama": WIDTHS[widths]}, "device": device, "checkpoint_every": 10**6,
        "output": str(out), "defaults": {"max_steps": steps, "alpha": 16, "micro_batch_size": 4,
                                         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "eval": {"every": 10, "samples": samples}, "tasks": tasks})


def run(text: str, out: Path, device: str) -> dict:
    out.mkdir(parents=True)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    r = SweepRun(parse_sweep(text), out)
    ready = time.time()
    r.run(log=lambda *_: None)
    trained = time.time()
    r.finish(log=lambda *_: None)
    end = time.time()
    with open(out / "leaderboard.csv", newline="") as f:
        board = list(csv.DictReader(f))
    best = {}
    for row in board:  # best first
        best.setdefault(row["task"], row)
    figures = step_figures(out / "steps.csv")[1]
    del r
    return {**figures, "wall_s": end - start, "setup_s": ready - start, "train_s": trained - ready,
            "finish_s": end - trained, "adapters": len(board),
            "peak_all_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan"), "best": best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per configuration")
    ap.add_argument("--widths", default="1b", choices=list(WIDTHS))
    ap.add_argument("--max-length", type=int, default=512, help="tokens a sequence is cut to")
    ap.add_argument("--eval-samples", type=int, default=32, help="held-out sequences of each evaluation")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_tasks_"))
    entries = [task_entry(name, write_task_data(root, name, lengths), args.max_length, args.eval_samples)
               for name, lengths in TASKS.items()]

    def run_sweep(tasks: list[dict], name: str, steps: int) -> dict:
        text = sweep(args.widths, tasks, root / name, steps, args.eval_samples, args.device)
        return run(text, root / name, args.device)

    run_sweep(entries[:1], "warm-up", 2)  # CUDA and kernel first uses: untimed
    results = {"multi-task (co-located)": run_sweep(entries, "multi", args.steps)}
    separate = [run_sweep([e], e["name"], args.steps) for e in entries]
    results["one sweep per task, in turn"] = {
        **{k: sum(s[k] for s in separate) for k in ("wall_s", "setup_s", "train_s", "finish_s")},
        "adapters": sum(s["adapters"] for s in separate), "steps": sum(s["steps"] for s in separate),
        "tokens_per_s": sum(s["tokens_per_s"] * s["step_s"] * s["steps"] for s in separate)
        / sum(s["step_s"] * s["steps"] for s in separate),
        "most_colocated": max(s["most_colocated"] for s in separate), "peak_all_gb": max(s["peak_all_gb"] for s in separate),
        "best": {k: v for s in separate for k, v in s["best"].items()}}
    print(f"{args.widths} widths, {len(TASKS)} tasks x 4 configurations, {args.steps} steps each, "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}")
    print(f"{'mode':<30}{'adapters':>9}{'steps':>7}{'co-loc':>7}{'tokens/s':>11}{'peak GB':>9}{'setup s':>9}"
          f"{'train s':>9}{'finish s':>10}{'wall s':>9}")
    for mode, r in results.items():
        print(f"{mode:<30}{r['adapters']:>9}{r['steps']:>7}{r['most_colocated']:>7}{r['tokens_per_s']:>11.0f}"
              f"{r['peak_all_gb']:>9.1f}{r['setup_s']:>9.1f}{r['train_s']:>9.1f}{r['finish_s']:>10.1f}{r['wall_s']:>9.1f}")
    one, each = results["multi-task (co-located)"], results["one sweep per task, in turn"]
    print(f"speed-up of the multi-task sweep: wall {each['wall_s'] / one['wall_s']:.2f}x, "
          f"training {each['train_s'] / one['train_s']:.2f}x")
    print(f"\n{'task':<8}{'mode':<30}{'best adapter':<24}{'export':>10}{'eval loss':>11}{'exact match':>13}")
    for name in TASKS:
        for mode, r in results.items():
            b = r["best"][name]
            print(f"{name:<8}{mode:<30}{b['adapter']:<24}{b['export'] + '@' + b['export_step']:>10}"
                  f"{float(b['eval_loss']):>11.4f}{b['metric_value'] or '-':>13}")


if __name__ == "__main__":
    main()
