"""Two real tuning tasks submitted one after the other through `alto submit` to the queue of a
local Ray on this machine's GPUs (issue 18): SmolLM2-135M (GGUF) on the chatterbot dialogues, each
task its own grid. Waits for the driver to end and prints, per task: its configurations, asked GPUs,
queueing, the duration the scheduler predicted at arrival and at its first measured step, the actual
duration, and the mean error of its predicted remaining time as it ran (predictions.csv). The queue
folder (status.json, events.csv, holds.csv, predictions.csv, timeline.png, each task's run folder)
is left under --out.

Run: python bench/bench_cluster.py --model /tmp/c/smollm2.gguf --data /tmp/c/chatterbot.jsonl --out OUT
(a CPU smoke run, CPU processes standing in for GPUs: --model tiny --device cpu --steps 4 --gap 0
--resource slot --cluster-gpus 2)
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from alto.task_queue import driver_running
from bench_sweep import model_spec

GRIDS = {  # two tenants' sweeps: a larger one first, a smaller one submitted while it runs
    "support-bot": {"rank": [8, 16], "lr": [1e-4, 3e-4], "micro_batch_size": [4, 8]},
    "faq-bot": {"rank": [4, 32], "lr": [2e-4]},
}


def write_sweep(folder: Path, name: str, grid: dict, model: str, data: str, steps: int, device: str) -> Path:
    doc = {"name": name, "device": device, "model": model_spec(model),
           "data": {"source": "jsonl", "path": data, "max_length": 256, "eval_fraction": 0.1},
           "defaults": {"max_steps": steps, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
           "grid": grid, "monitor": {"rule": "asha", "grace": steps // 4, "eta": 2},
           "eval": {"every": steps // 4, "samples": 32}, "checkpoint_every": steps // 4}
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(doc))
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="SmolLM2 GGUF file (or bench_sweep's other --model choices)")
    ap.add_argument("--data", required=True, help="chat records (JSONL)")
    ap.add_argument("--out", default="cluster_out")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu with --resource slot --cluster-gpus N")
    ap.add_argument("--gap", type=float, default=20.0, help="seconds between the two submissions")
    ap.add_argument("--resource", default="GPU", help="alto submit --resource (slot: CPU processes as GPUs)")
    ap.add_argument("--cluster-gpus", type=int, help="alto submit --cluster-gpus (default: the GPUs here)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    queue = out / "queue"
    start = time.time()
    for i, (name, grid) in enumerate(GRIDS.items()):
        if i:
            time.sleep(args.gap)
        sweep = write_sweep(out, name, grid, args.model, args.data, args.steps, args.device)
        cmd = [sys.executable, "-m", "alto.cli", "submit", str(sweep), "--queue", str(queue), "--linger", "5",
               "--resource", args.resource, *(["--cluster-gpus", str(args.cluster_gpus)] if args.cluster_gpus else [])]
        print(f"[{time.time() - start:6.1f}s] $ alto submit {sweep.name} --queue {queue}", flush=True)
        subprocess.run(cmd, check=True)
    time.sleep(2)
    while driver_running(queue):  # it holds its lock until it ends
        time.sleep(2)
    print(subprocess.run([sys.executable, "-m", "alto.cli", "status", "--queue", str(queue)],
                         capture_output=True, text=True).stdout)
    status = json.loads((queue / "status.json").read_text())
    with open(queue / "events.csv") as f:
        events = list(csv.DictReader(f))
    with open(queue / "predictions.csv") as f:
        predictions = list(csv.DictReader(f))
    print("task | configs | GPUs | arrived s | started s | queued s | predicted at arrival s | "
          "predicted at first step s | actual s | mean abs error of predicted remaining")
    print("--- | --- | --- | --- | --- | --- | --- | --- | --- | ---")
    for t in status["tasks"]:
        mine = [e for e in events if e["task"] == t["name"]]
        arrived = float(next(e["time_s"] for e in mine if e["event"] == "arrive"))
        started = float(next(e["time_s"] for e in mine if e["event"] == "start"))
        ended = float(next(e["time_s"] for e in mine if e["event"] in ("done", "failed", "cancelled")))
        rows = [p for p in predictions if p["task"] == t["name"]]
        errors = [abs(float(p["predicted_left_s"]) - (ended - float(p["time_s"]))) for p in rows]
        configs = sum(1 for _ in open(queue / "tasks" / t["name"] / "run" / "leaderboard.csv")) - 1
        print(f"{t['name']} | {configs} | {t['asked']} | {arrived:.1f} | {started:.1f} | {started - arrived:.1f} | "
              f"{t['predicted_total_s']:.1f} | {float(rows[0]['predicted_left_s']) if rows else float('nan'):.1f} | "
              f"{ended - started:.1f} | {sum(errors) / max(1, len(errors)):.1f} s over {len(errors)} polls")
    return 0 if all(t["state"] == "done" for t in status["tasks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
