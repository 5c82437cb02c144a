"""The sharded frozen base (FSDP2) with rank-local adapters, through `alto tune`: the same sweep on one
GPU with the whole base, on N GPUs over a replicated base, and on N GPUs over the sharded base.

Per row: wall, mean step seconds (rank 0's steps.csv, after the first WARM_UP steps), rank 0's peak
memory (bf16 base; ranks are symmetric), and the largest relative difference of any adapter's
per-step losses from the one-GPU run (bf16: the sharded and replicated rows run the same math;
against one GPU the co-located sets differ, so bf16 rounding differs). --too-large: also a base
that does not fit one GPU with its activations, trained sharded only.
Run on a multi-GPU machine: python bench/bench_sharded.py [--nproc 2] [--layers 32]
(bench/device_run.sh sharded; a CPU smoke run, gloo ranks: --device cpu --nproc 2 --widths tiny --configs 2 --steps 2).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench_memory import WIDTHS, step_figures, write_data

from alto.tune import tune


def sweep_file(root: Path, name: str, model: dict, data: Path, configs: int, steps: int, shard: bool, device: str) -> str:
    adapters = [{"id": f"c{i}", "rank": (8, 16, 32, 64)[i % 4], "micro_batch_size": (1, 2, 4)[i % 3],
                 "lr": 1e-4 * (1 + i % 5), "seed": i} for i in range(configs)]
    path = root / f"{name}.yaml"
    path.write_text(json.dumps({
        "name": name, "model": {"random_llama": model}, "device": device, "checkpoint_every": 10**6,
        "output": str(root / name), "data": {"source": "jsonl", "path": str(data), "max_length": 512, "eval_fraction": 0.0},
        "defaults": {"max_steps": steps, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "adapters": adapters, "shard_base": shard, "max_running": configs}))
    return str(path)


def losses(run_dir: Path) -> dict[tuple[str, int], float]:
    rows = (run_dir / "losses.csv").read_text().splitlines()[1:]
    return {(r.split(",")[1], int(r.split(",")[0])): float(r.split(",")[3]) for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--widths", default="8b", choices=list(WIDTHS))
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (0: the widths' own)")
    ap.add_argument("--configs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--too-large", type=int, default=0, help="also: this many layers, sharded only (does not fit one GPU)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    model = {**WIDTHS[args.widths], **({"num_hidden_layers": args.layers} if args.layers else {})}
    cols = ["base", "layers", "ranks", "wall_s", "step_s", "peak_gb", "max_rel_loss_diff_vs_1"]
    print(f"{args.widths} widths, {args.configs} configs x {args.steps} steps, q/k/v/o, device {args.device}\n")
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data.jsonl"
        write_data(data, 600)
        plan = [("whole", model, 1, False), ("replicated", model, args.nproc, False), ("sharded", model, args.nproc, True)]
        if args.too_large:
            plan.append(("sharded", {**model, "num_hidden_layers": args.too_large}, args.nproc, True))
        reference = None
        for i, (label, widths, nproc, shard) in enumerate(plan):
            path = sweep_file(root, f"r{i}", widths, data, args.configs, args.steps, shard, args.device)
            start = time.time()
            rc = tune(path, None, nproc=nproc, log=lambda *_: None)
            wall = time.time() - start
            if rc != 0:
                print(f"{label} | {widths['num_hidden_layers']} | {nproc} | failed (exit {rc})", flush=True)
                continue
            figures = step_figures(root / f"r{i}" / "steps.csv")[1]
            got = losses(root / f"r{i}")
            reference = reference if reference is not None else got
            diff = (max(abs(got[k] - reference[k]) / abs(reference[k]) for k in reference)
                    if widths is model and got.keys() == reference.keys() else float("nan"))
            print(f"{label} | {widths['num_hidden_layers']} | {nproc} | {wall:.1f} | {figures['step_s']:.3f} | "
                  f"{figures['peak_gb']:.2f} | {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
