"""``alto tune``: checks the sweep file and flags, then runs the sweep on one rank or several
(alto.sweep_run.SweepRun each), from scratch or from a run folder's checkpoint (--resume)."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from alto import checkpoint, records, results
from alto.base import device_type, smollm2_dir
from alto.inputs import INPUT_ERRORS, read_text, report
from alto.parallel import Group, launch, oversubscribed, record_threads, run_threads
from alto.search import searcher_of
from alto.sweep import Sweep, parse_sweep
from alto.sweep_run import SweepRun, quiet

# transformers imports torchao (installed for base.quantize: nf4) whenever it loads a model, and
# torchao 0.18's import makes torch log two deprecation warnings about its own enums; a run's output
# (and an error's one line) should not carry them. Set here: every rank's process imports this module.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def run_folder(sweep: Sweep) -> Path:
    """Where a sweep's run goes: its output, else runs/<name>."""
    return Path(sweep.output or Path("runs") / sweep.name)


def tune(sweep_path: str | None, resume: str | None, stop_after: int | None = None, log=print,
         nproc: int = 1, bar: bool = False, started: float | None = None, *, text: str | None = None,
         on_step=None, on_evaluation=None) -> int:
    """The `alto tune` command (and alto.api.run): returns its exit code. Bad input raises
    ValueError (the CLI turns it into one line and exit code 2), before anything is written; with
    nproc > 1 what loading the model, data or checkpoint finds is reported by rank 0 (exit code 2).
    nproc > 1 runs the sweep on that many local ranks (one GPU each, or CPU processes); under
    torchrun the ranks come from the environment. text: the sweep itself (instead of sweep_path).
    on_step / on_evaluation: SweepRun.run's callbacks (this process's rank 0: nproc 1). started: when
    the command began (time.time(): the CLI's process start; default: this call), where
    timing.json's wall starts."""
    started = time.time() if started is None else started
    if nproc != 1 and (on_step or on_evaluation):
        raise ValueError(f"--nproc={nproc!r}: step and evaluation callbacks run in this process (nproc 1)")
    if stop_after is not None and (not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"--stop-after={stop_after!r} must be an int >= 1")
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc={nproc!r} must be an int >= 1")
    if resume:
        run_dir = Path(resume)
        if (run_dir / results.LEADERBOARD).is_file() and not (run_dir / checkpoint.CHECKPOINT).is_file():
            raise ValueError(f"--resume: the run in {resume!r} is complete ({results.LEADERBOARD}): nothing to resume")
        if not (run_dir / "sweep.yaml").is_file() or not (run_dir / checkpoint.CHECKPOINT).is_file():
            raise ValueError(f"--resume: {resume!r} is not a run folder with sweep.yaml and {checkpoint.CHECKPOINT}")
        source = str(run_dir / "sweep.yaml")
        text = read_text(source, "sweep file")
        sweep = parse_sweep(text, source)
    else:
        if text is not None:
            source = sweep_path or "sweep"
        elif sweep_path is None:
            from alto.sweep import DEFAULT_SWEEP

            text, source = DEFAULT_SWEEP, "default sweep"
        else:
            text, source = read_text(sweep_path, "sweep file"), sweep_path
        sweep = parse_sweep(text, source)
        run_dir = run_folder(sweep)
        if run_dir.exists() and not run_dir.is_dir():
            raise ValueError(f"output: {str(run_dir)!r} is a file; the run folder must be a folder")
        if (run_dir / results.LEADERBOARD).exists():
            raise ValueError(f"output folder {str(run_dir)!r} holds a completed run ({results.LEADERBOARD}): "
                             "choose another output")
        if (run_dir / checkpoint.CHECKPOINT).exists():
            raise ValueError(f"output folder {str(run_dir)!r} holds a run already: --resume it or choose another output")
    # Missing packages and devices fail here, before anything is written.
    for task in sweep.tasks.values():
        if task.data["source"] == "chatterbot":
            try:
                records.load_records("chatterbot", topics=task.data.get("topics"), pairs=task.objective == "dpo")
            except ValueError as e:
                raise ValueError(f"{task.where}{e}") from None
    if sweep.model == "smollm2":
        smollm2_dir()
    if sweep.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda, but torch sees no CUDA GPU on this machine (use auto or cpu)")
    if nproc > 1 and device_type(sweep.device) == "cuda" and torch.cuda.device_count() < nproc:
        raise ValueError(f"--nproc={nproc} but only {torch.cuda.device_count()} GPUs are visible")
    args = (text, source, str(run_dir), bool(resume), stop_after)
    if nproc > 1:
        return launch(run_rank, nproc, (*args, print, None, None, bar, started))[0]
    return run_rank(*args, log=log, on_step=on_step, bar=bar, started=started, on_evaluation=on_evaluation,
                    raise_errors=True)


HALTED = 75  # run_rank's code when should_halt stopped it at a checkpoint (EX_TEMPFAIL: resume later)


def run_rank(text: str, source: str, run_dir: str, resume: bool, stop_after: int | None, log=print,
             should_halt=None, on_step=None, bar: bool = False, started: float | None = None, on_evaluation=None,
             raise_errors: bool = False) -> int:
    """One rank of `alto tune` (the only one without parallelism). Each rank is its own process, so
    bad input found here (the model, the data, the checkpoint) is reported here: one line from rank
    0, exit code 2, before anything is written. stop_after: micro-steps this process runs before it
    stops at a checkpoint (counted from where it starts: 0, or the checkpoint it resumes). should_halt /
    on_step: SweepRun.run's (alto.cluster); a halted run returns HALTED. bar: progress as a bar (a terminal);
    started: tune's. raise_errors (one rank): bad input raised, for the caller to report."""
    sweep, run_dir = parse_sweep(text, source), Path(run_dir)
    group = Group.from_env(device_type(sweep.device), process_group=sweep.shard_base is True)
    launched = torch.get_num_threads()
    try:
        try:
            torch.set_num_threads(run_threads(run_dir, resume))  # before any float math (alto.parallel.rank_threads)
            run = SweepRun(sweep, run_dir, group, started, resume)  # loads model and data: still nothing written
        except INPUT_ERRORS as e:  # every rank fails alike (each is its own process): rank 0 says why
            if raise_errors and group.world == 1:
                raise
            return report("tune", e) if group.is_leader else 2
        if group.is_leader:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                (run_dir / "sweep.yaml").write_text(text)
                record_threads(run_dir)
            elif (warning := oversubscribed(int(os.environ.get("LOCAL_WORLD_SIZE", group.world)))) is not None:
                log(warning)
        else:
            log = quiet
        if resume:
            log(f"resumed {run_dir} at micro-step {run.micro_steps}")
        ranks = f" x {group.world} ranks" if group.world > 1 else ""
        tasks = f" of {len(sweep.tasks)} tasks" if len(sweep.tasks) > 1 else ""
        threads = torch.get_num_threads()
        planned = sum(searcher_of(t).planned(t) for t in sweep.tasks.values())
        log(f"{planned} adapters{tasks} on {run.device}{ranks}, {threads} CPU thread{'s' * (threads > 1)}"
            f"{' each' if ranks else ''} | "
            f"{sum(map(len, run.train_seqs.values()))} train / {sum(map(len, run.evaluation.eval_seqs.values()))} held-out sequences")
        until = None if stop_after is None else run.micro_steps + stop_after  # --stop-after counts from here
        if run.run(until, log, should_halt, on_step, bar, on_evaluation):
            run.finish(log)
            return 0
        if until is not None and run.micro_steps >= until:
            log(f"stopped at micro-step {run.micro_steps} (--stop-after {stop_after}), checkpoint written; "
                f"continue with: alto tune --resume {run_dir}")
            return 0
        return HALTED
    finally:
        torch.set_num_threads(launched)  # a caller in this process (a test) keeps its own
        group.close()
