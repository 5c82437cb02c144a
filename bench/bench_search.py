"""A search over LoRA hyperparameters: Optuna's TPE through ALTO against the same Optuna study run the
way users run it today, and ALTO's search against a full grid over the same ranges.

All three train on the same sequences (alto.data's tokenization of the same JSONL, the same held-out
split), each configuration for the same steps, with the held-out loss (mean token loss over the same
held-out sequences) every --eval-every steps; a configuration's result is its best held-out loss:

  (p) Optuna + PEFT: study.optimize over an objective that trains each trial as an HF PEFT job (bf16
      autocast, fused AdamW) on one base loaded once, reports each held-out loss to Optuna's pruner
      (trial.report / should_prune) and saves the adapter; the study on SQLite, its TPE seeded. Timed
      in this process from the base's load (generous to it: no start-up).
  (s) ALTO's search: `alto tune` with the same `search:` (sampler, seed, pruner, space, trials), in
      its own process, timed from outside; trials proposed --parallel at a time into the co-located
      steps, then one per slot an ended trial frees.
  (g) ALTO's grid of every combination of --grid (default 48 configurations over the same ranges),
      trained to the end (no pruner): the reference for what the search finds.

The best of (p) and (s) is their study's best value (complete trials: what the search returns);
the best of (g) is the lowest held-out loss of any configuration at any evaluation.
Columns: wall seconds (the whole search), speed-up over (p), trials complete / pruned, configurations
trained x steps, the best held-out loss and the parameters that reached it, where the wall went.
Warm-up first, untimed: a 2-configuration ALTO grid and one PEFT job (CUDA's and the kernels' first uses).
The last lines are the record: SEARCH (the issue's line) and GRID (search vs grid).

Run on the GPU: python bench/bench_search.py --model smollm2 [--trials 48] [--parallel 16] [--steps 40]
(a CPU smoke run: --device cpu --model tiny --trials 4 --parallel 2 --steps 2 --eval-every 1 --max-length 64
 --eval-samples 4 --grid '{"rank": [2, 4]}')
"""
from __future__ import annotations

import argparse
import ast
import csv
import datetime
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch

import real_data
from alto.optuna_search import PRUNERS, STUDY_FILE, OptunaSearch
from alto.search_spec import Dimension
from bench_sweep import ALL_PROJECTIONS, PHASES, alto_tune, base_folder, load_once, model_spec, peft_job

SPACE = {"rank": {"low": 8, "high": 64, "log": True}, "lr": {"low": 1e-5, "high": 3e-3, "log": True},
         "alpha": {"low": 16, "high": 64, "log": True}}
GRID = {"rank": [8, 16, 32, 64], "lr": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3], "alpha": [16, 64]}  # 48, within SPACE
METHODS = {"p": "(p) Optuna + PEFT jobs", "s": "(s) ALTO search", "g": "(g) ALTO grid"}


@dataclass
class Row:
    method: str
    wall: float
    complete: int
    pruned: int
    steps: int  # configuration-steps trained
    best: float
    params: dict
    phases: dict[str, float] = field(default_factory=dict)


def sweep_doc(args, model, data: Path, out: Path, grid: dict | None = None) -> dict:
    """The sweep: the search (grid None) or a grid, over the same defaults, data and evaluations."""
    doc = {"name": out.name, "model": model, "device": args.device, "checkpoint_every": 10**6, "output": str(out),
           "data": {"source": "jsonl", "path": str(data), "max_length": args.max_length, "eval_fraction": 0.1},
           "defaults": {"max_steps": args.steps, "micro_batch_size": args.micro_batch_size,
                        "target_modules": ALL_PROJECTIONS},
           "eval": {"every": args.eval_every, "samples": args.eval_samples}}
    if grid is None:
        doc["search"] = {"sampler": "tpe", "trials": args.trials, "seed": args.seed, "parallel": args.parallel,
                         "pruner": args.pruner, "space": SPACE}
    else:
        doc["grid"] = grid
    return doc


def study_row(method: str, wall: float, study: optuna.Study, phases: dict[str, float], max_steps: int) -> Row:
    states = [t.state for t in study.trials]
    steps = sum(max(t.intermediate_values, default=max_steps) if t.state == optuna.trial.TrialState.PRUNED
                else max_steps for t in study.trials)
    return Row(method, wall, states.count(optuna.trial.TrialState.COMPLETE), states.count(optuna.trial.TrialState.PRUNED),
               steps, study.best_value, study.best_params, phases)


# ---- (s) and (g): alto tune -----------------------------------------------------------------------
def alto_search(args, model, data: Path, out: Path) -> Row:
    wall, phases = alto_tune(args, sweep_doc(args, model, data, out), out)
    study = optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / STUDY_FILE}")
    return study_row("s", wall, study, phases, args.steps)


def alto_grid(args, model, data: Path, out: Path, grid: dict) -> Row:
    wall, phases = alto_tune(args, sweep_doc(args, model, data, out, grid), out)
    with open(out / "evals.csv", newline="") as f:
        evals = [r for r in csv.DictReader(f) if r["eval_loss"]]
    best = min(evals, key=lambda r: float(r["eval_loss"]))
    with open(out / "leaderboard.csv", newline="") as f:
        board = {r["adapter"]: r for r in csv.DictReader(f)}
    config = ast.literal_eval(board[best["adapter"]]["config"])  # written as the configuration's dict
    params = {k: config[k] for k in grid}
    return Row("g", wall, len(board), 0, sum(int(r["steps"]) for r in board.values()), float(best["eval_loss"]),
               params, phases)


# ---- (p): Optuna + PEFT, as users run it ----------------------------------------------------------
def suggest(trial: optuna.Trial, d: Dimension):
    """The objective's trial.suggest_* for one dimension of the search space."""
    if d.choices is not None:
        return trial.suggest_categorical(d.field, list(d.choices))
    if d.is_int:
        return trial.suggest_int(d.field, int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
    return trial.suggest_float(d.field, d.low, d.high, step=d.step, log=d.log)


def optuna_peft(args, model, data: Path, out: Path) -> Row:
    out.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    start = time.perf_counter()
    task, base, device, train, held = load_once(args, json.dumps(sweep_doc(args, model, data, out)), phases)

    def objective(trial: optuna.Trial) -> float:
        cfg = OptunaSearch.config_of(task, {d.field: suggest(trial, d) for d in task.search.space}, trial.number)

        def report(step: int, loss: float) -> None:
            trial.report(loss, step)
            if trial.should_prune():
                raise optuna.TrialPruned()

        job = peft_job(base, cfg, train, held, device, out / f"trial{trial.number}", eval_every=task.eval.every,
                       on_eval=report, times=phases)
        return min(job["losses"])

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searching = time.perf_counter()
    study = optuna.create_study(storage=f"sqlite:///{out / STUDY_FILE}", study_name=out.name, direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=args.seed), pruner=PRUNERS[args.pruner]())
    study.optimize(objective, n_trials=args.trials)
    wall = time.perf_counter() - start
    # other: what the search spent besides the jobs' training, evaluations and saves (PEFT's wrapping
    # and unloading, Optuna's sampler and storage)
    phases["other"] = time.perf_counter() - searching - sum(phases.get(p, 0.0) for p in ("train", "evaluate", "export"))
    return study_row("p", wall, study, phases, args.steps)


# ---- the table ------------------------------------------------------------------------------------
HEADER = ("| method | wall s | speed-up vs (p) | complete | pruned | configuration-steps | best held-out loss | "
          "its parameters | " + " | ".join(PHASES) + " |\n|" + " --- |" * (8 + len(PHASES)))


def table_line(r: Row, rows: list[Row]) -> str:
    p = next((x for x in rows if x.method == "p"), None)
    speed = f"{p.wall / r.wall:.2f}x" if p else "-"
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(r.params.items()))
    return (f"| {METHODS[r.method]} | {r.wall:.1f} | {speed} | {r.complete} | {r.pruned} | {r.steps} | {r.best:.4f} | "
            f"{params} | " + " | ".join(f"{r.phases.get(p, 0.0):.1f}" for p in PHASES) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 | 1b | tiny | path/to/model.gguf | {random_llama widths}")
    ap.add_argument("--trials", type=int, default=48)
    ap.add_argument("--parallel", type=int, default=16, help="(s): trials proposed as the steps begin")
    ap.add_argument("--seed", type=int, default=0, help="the TPE sampler's seed")
    ap.add_argument("--pruner", default="median", choices=sorted(PRUNERS))
    ap.add_argument("--grid", default=json.dumps(GRID), help="(g): JSON {field: [values]}, every combination")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per configuration")
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=10, help="steps between held-out evaluations")
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--data", default="python-docs", help="python-docs (generated), or a JSONL file")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--methods", default="psg", help="which rows: any of p, s, g")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default="", help="folder for the runs (default: a new temporary one)")
    ap.add_argument("--rows", default="", help="an earlier run's bench_search.json (same settings, same machine): "
                    "its rows join the table (one call's time limit may not hold all three methods)")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="bench_search_"))
    root.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data != "python-docs" else real_data.python_docs(root / "python-docs.jsonl")
    spec = base_folder(args, model_spec(args.model), data, root)
    grid = json.loads(args.grid)

    quick = argparse.Namespace(**{**vars(args), "steps": 2, "trials": 1, "parallel": 1, "eval_every": 1})
    two = {k: v[:2] if i == 0 else v[:1] for i, (k, v) in enumerate(grid.items())}  # 2 configurations
    alto_grid(quick, spec, data, root / "warm-up", two)
    optuna_peft(quick, spec, data, root / "warm-up-peft")

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{args.model}, {args.trials} trials (TPE, seed {args.seed}, pruner {args.pruner}) of {args.steps} steps, "
          f"micro-batch {args.micro_batch_size}, held-out loss every {args.eval_every} steps on {args.eval_samples} "
          f"sequences, data {data.name} (max_length {args.max_length}), {device}, torch {torch.__version__}\n{HEADER}",
          flush=True)
    earlier = json.loads(Path(args.rows).read_text()) if args.rows else []
    rows = [Row(**r) for r in earlier if r["method"] not in args.methods]  # a method run now replaces its row
    for r in rows:
        print(table_line(r, rows) + " (earlier run)", flush=True)
    run = {"p": lambda: optuna_peft(args, spec, data, root / "optuna-peft"),
           "s": lambda: alto_search(args, spec, data, root / "alto-search"),
           "g": lambda: alto_grid(args, spec, data, root / "alto-grid", grid)}
    for method in "psg":
        if method in args.methods:
            rows.append(run[method]())
            print(table_line(rows[-1], rows), flush=True)
    print("\n" + HEADER)
    for r in rows:
        print(table_line(r, rows))
    (root / "bench_search.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    by = {r.method: r for r in rows}
    today = datetime.date.today()
    print(f"\nruns and bench_search.json: {root}")
    if "p" in by and "s" in by:
        print(f"SEARCH {today} {device} trials={args.trials}: alto {by['p'].wall / by['s'].wall:.2f}x vs optuna+peft | "
              f"best held-out loss alto {by['s'].best:.4f} peft {by['p'].best:.4f}")
    if "s" in by and "g" in by:
        print(f"GRID {today} {device}: alto's TPE search of {args.trials} trials {by['s'].best:.4f} vs the best of a "
              f"{by['g'].complete}-configuration grid {by['g'].best:.4f} ({by['s'].best / by['g'].best - 1:+.2%}; "
              f"target within +1%)")


if __name__ == "__main__":
    main()
