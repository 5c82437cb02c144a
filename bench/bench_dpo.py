"""DPO sweeps: K preference-tuning configurations co-located by ALTO against the same K trained one
after another by TRL's DPOTrainer over PEFT, the way users run them today.

Both sides train the same configurations (ranks 8-32, betas 0.05-0.5, learning rates 1e-5-3e-4,
sigmoid and ipo losses, 4 pairs a micro-batch, all 7 projections) on the same pairs (alto.data's
tokenization of the same JSONL, each configuration's pairs in the order ALTO gives it) for the same
optimizer steps, and end with each configuration's held-out DPO loss and reward accuracy and its
adapter saved:

  (t) sequential TRL jobs: DPOTrainer (bf16, fused AdamW, its reference the adapter-free model)
      over a PEFT model of a copy of the base, which is loaded and tokenized once (generous to
      it: separate jobs reload both); held-out metrics by trainer.evaluate on the same pairs.
  (a) ALTO: `alto tune SWEEP.yaml` (objective: dpo) in its own process, timed from outside
      (start-up, imports and exit included); the base scores each distinct sequence once for all.

Columns: wall seconds, speed-up over (t), optimizer steps, the best configuration and its held-out
DPO loss and reward accuracy, and where the wall went. Warm-up first, untimed: one short run of each.
The last line is the record: DPO <date> <device> K=<k>: alto <x>x vs trl.

Run on the GPU: python bench/bench_dpo.py --model 1b --k 16 [--steps 20]
(a CPU smoke run: --device cpu --model tiny --k 2 --steps 2 --max-length 64 --eval-samples 4)
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import real_data
from alto.timing import timed
from alto.train import DataStream
from bench_sweep import ALL_PROJECTIONS, PHASES, alto_tune, base_folder, gpu_sync, load_once, model_spec

METHODS = {"t": "(t) sequential TRL DPOTrainer jobs", "a": "(a) ALTO co-located"}


def configurations(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        rank = rng.choice((8, 16, 32))
        out.append({"id": f"c{i:02d}", "rank": rank, "alpha": 2 * rank, "lr": rng.choice((1e-5, 3e-5, 1e-4, 3e-4)),
                    "beta": rng.choice((0.05, 0.1, 0.3, 0.5)), "loss_type": ("sigmoid", "ipo")[i % 2], "seed": i})
    return out


def sweep_doc(args, model, data: Path, adapters: list[dict], out: Path) -> dict:
    return {"name": out.name, "model": model, "device": args.device, "checkpoint_every": 10**6, "output": str(out),
            "objective": "dpo",
            "data": {"source": "jsonl", "path": str(data), "max_length": args.max_length, "eval_fraction": 0.1},
            "defaults": {"max_steps": args.steps, "micro_batch_size": 4, "target_modules": ALL_PROJECTIONS},
            "adapters": adapters, "eval": {"every": None, "samples": args.eval_samples}}


@dataclass
class Row:
    method: str
    k: int
    wall: float
    steps: int
    results: dict[str, tuple[float, float]]  # configuration -> (held-out DPO loss, reward accuracy)
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def best(self) -> str:
        """alto.results.ranking's: the highest reward accuracy, then the lowest DPO loss."""
        return min(self.results, key=lambda c: (-self.results[c][1], self.results[c][0]))


def alto_row(args, model, data: Path, adapters: list[dict], out: Path) -> Row:
    wall, phases = alto_tune(args, sweep_doc(args, model, data, adapters, out), out)
    with open(out / "leaderboard.csv", newline="") as f:
        board = list(csv.DictReader(f))
    return Row("a", len(adapters), wall, sum(int(r["steps"]) for r in board),
               {r["adapter"]: (float(r["eval_loss"]), float(r["metric_value"])) for r in board}, phases)


def as_trl_pairs(sequences: list[list[int]]) -> dict[str, list[list[int]]]:
    """alto's pairs (prompt context-only, ~id) as TRL's pre-tokenized columns."""
    columns: dict[str, list[list[int]]] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for chosen, rejected in zip(sequences[::2], sequences[1::2]):
        columns["prompt_ids"].append([~t for t in chosen if t < 0])
        columns["chosen_ids"].append([t for t in chosen if t >= 0])
        columns["rejected_ids"].append([t for t in rejected if t >= 0])
    return columns


def trl_rows(args, model, data: Path, adapters: list[dict], root: Path) -> Row:
    """Each configuration as its own DPOTrainer job, one after another, after one load and one
    tokenization."""
    import datasets
    import peft
    import transformers
    import trl

    class Given(trl.DPOTrainer):
        def _prepare_dataset(self, dataset, *_, **__):  # pre-tokenized: alto's tokens
            return dataset

    phases: dict[str, float] = {}
    start = time.perf_counter()
    task, base, device, train, held = load_once(args, json.dumps(sweep_doc(args, model, data, adapters, root / "unused")),
                                                phases)
    cuda = device.type == "cuda"
    held_out = datasets.Dataset.from_dict(as_trl_pairs(held))
    results, steps = {}, 0
    for aid, cfg in task.adapters.items():
        with timed(phases, "other"):
            lora = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                                   target_modules=list(cfg.target_modules))
            # a fresh copy of the base per job: DPOTrainer adds a "ref" adapter and patches the model's forward
            policy = peft.get_peft_model(copy.deepcopy(base.model), lora)
            stream = DataStream.shuffled(train, cfg.seed, per_sample=2)  # the pairs in the order ALTO gives them
            order = [s.tolist() for _ in range(cfg.max_steps * cfg.grad_accum) for s in stream.next_batch(cfg.micro_batch_size)]
            config = trl.DPOConfig(
                output_dir=str(root / aid), per_device_train_batch_size=cfg.micro_batch_size,
                per_device_eval_batch_size=cfg.micro_batch_size, gradient_accumulation_steps=cfg.grad_accum,
                max_steps=cfg.max_steps, learning_rate=cfg.lr, lr_scheduler_type=cfg.schedule, beta=cfg.beta,
                loss_type=cfg.loss_type, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm or 0.0,
                bf16=cuda, use_cpu=not cuda, optim="adamw_torch_fused" if cuda else "adamw_torch",
                gradient_checkpointing=False, train_sampling_strategy="sequential", max_length=None,
                logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, seed=cfg.seed)
            trainer = Given(model=policy, args=config, train_dataset=datasets.Dataset.from_dict(as_trl_pairs(order)),
                            eval_dataset=held_out, processing_class=base.tokenizer)
            trainer.remove_callback(transformers.PrinterCallback)  # its metrics lines
        with timed(phases, "train"):
            trainer.train()
            gpu_sync()
        with timed(phases, "evaluate"):
            metrics = trainer.evaluate()
        with timed(phases, "export"):
            policy.save_pretrained(str(root / aid), selected_adapters=["default"])
        results[aid] = (metrics["eval_loss"], metrics["eval_rewards/accuracies"])
        steps += cfg.max_steps
        del trainer, policy
    return Row("t", len(adapters), time.perf_counter() - start, steps, results, phases)


HEADER = ("| method | K | wall s | speed-up vs (t) | optimizer steps | best | its DPO loss | its reward accuracy | "
          + " | ".join(PHASES) + " |\n|" + " --- |" * (8 + len(PHASES)))


def table_line(r: Row, rows: list[Row]) -> str:
    t = next((x for x in rows if x.method == "t" and x.k == r.k), None)
    speed = f"{t.wall / r.wall:.2f}x" if t else "-"
    loss, accuracy = r.results[r.best]
    return (f"| {METHODS[r.method]} | {r.k} | {r.wall:.1f} | {speed} | {r.steps} | {r.best} | {loss:.4f} | "
            f"{accuracy:.3f} | " + " | ".join(f"{r.phases.get(p, 0.0):.1f}" for p in PHASES) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1b", help="1b | 8b | tiny | smollm2 | path/to/model.gguf | {random_llama widths}")
    ap.add_argument("--k", type=int, default=16, help="configurations")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per configuration")
    ap.add_argument("--data", default="chatterbot-pairs", help="chatterbot-pairs (generated), or a JSONL of pairs")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=32, help="held-out pairs")
    ap.add_argument("--methods", default="ta", help="which rows: any of t, a")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default="", help="folder for the runs (default: a new temporary one)")
    args = ap.parse_args()
    args.eval_every = None  # base_folder's sweep (bench_sweep's) reads it
    root = Path(args.out or tempfile.mkdtemp(prefix="bench_dpo_"))
    root.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data != "chatterbot-pairs" else real_data.chatterbot_pairs(root / "pairs.jsonl")
    spec = base_folder(args, model_spec(args.model), data, root)
    adapters = configurations(args.k)

    quick = argparse.Namespace(**{**vars(args), "steps": 2})  # untimed: CUDA's and the kernels' first uses
    alto_row(quick, spec, data, adapters[:1], root / "warm-up")
    if "t" in args.methods:
        trl_rows(quick, spec, data, adapters[:1], root / "warm-up-trl")

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{args.model}, K={args.k} DPO configurations of {args.steps} steps, data {data.name} (max_length "
          f"{args.max_length}), {device}, torch {torch.__version__}\n{HEADER}", flush=True)
    rows: list[Row] = []
    run = {"t": lambda: trl_rows(args, spec, data, adapters, root / "trl"),
           "a": lambda: alto_row(args, spec, data, adapters, root / "alto")}
    for method in "ta":
        if method in args.methods:
            rows.append(run[method]())
            print(table_line(rows[-1], rows), flush=True)
    (root / "bench_dpo.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    by = {r.method: r for r in rows}
    print(f"\nruns and bench_dpo.json: {root}")
    if "t" in by and "a" in by:
        print(f"DPO {datetime.date.today()} {device} K={args.k}: alto {by['t'].wall / by['a'].wall:.2f}x vs trl")


if __name__ == "__main__":
    main()
