"""`alto tune` end to end on a tiny random Llama: outputs, kill and resume, early termination, data
sources (bad input: test_bad_inputs.py)."""
import json

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from alto.cli import main  # noqa: E402
from alto.sweep import parse_sweep  # noqa: E402
from alto.timing import PHASES  # noqa: E402
from alto.sweep_run import SweepRun  # noqa: E402
from alto.tune import tune  # noqa: E402
from conftest import interrupt  # noqa: E402


def test_tune_end_to_end_writes_every_output(tmp_path, capsys, sweep_yaml):
    assert main(["tune", str(sweep_yaml())]) == 0
    run = tmp_path / "run"
    out = capsys.readouterr().out
    assert "step    1 | running 4 | queued 0" in out and "eval loss" in out
    board = (run / "leaderboard.csv").read_text().splitlines()
    assert len(board) == 5 and board[0].startswith("rank,task,task_rank,adapter")
    rows = (run / "losses.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 3  # 4 adapters x 3 micro-steps (max_steps 3, no accumulation)
    assert (run / "losses.png").stat().st_size > 10_000
    for aid in ["rank2-lr0p001", "rank4-lr0p003"]:
        cfg = json.loads((run / "adapters" / aid / "adapter_config.json").read_text())
        assert cfg["r"] == int(aid[4]) and cfg["peft_type"] == "LORA"
        assert json.loads((run / "adapters" / aid / "alto_adapter.json").read_text())["status"] == "finished"
    seconds = json.loads((run / "timing.json").read_text())  # where the run's time went
    assert list(seconds) == list(PHASES)  # the whole wall, each second in one phase
    assert seconds["train"] > 0 and seconds["evaluate"] > 0 and seconds["export"] > 0 and "seconds: startup" in out


def test_a_completed_run_leaves_its_results_not_a_checkpoint_unless_its_end_fails(tmp_path, sweep_yaml, monkeypatch, capsys):
    """A completed run's final checkpoint is written while its end runs and stopped or removed
    once the results are written (no wait for a ~GB write); its folder is still never run over,
    and --resume says it is complete. When the end fails, that checkpoint is on disk: --resume
    redoes only the end, to the results of a run that never failed."""
    from safetensors.torch import load_file

    from alto import results

    assert tune(str(sweep_yaml(out="whole")), None, log=lambda *_: None) == 0
    whole = tmp_path / "whole"
    assert (whole / "leaderboard.csv").is_file() and not (whole / "checkpoint.pt").exists()
    assert main(["tune", str(tmp_path / "whole.yaml")]) == 2
    assert main(["tune", "--resume", str(whole)]) == 2
    err = capsys.readouterr().err
    assert "holds a completed run (leaderboard.csv): choose another output" in err
    assert "is complete (leaderboard.csv): nothing to resume" in err

    finish = results.finish

    def failing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(results, "finish", failing)
    with pytest.raises(OSError, match="disk full"):
        tune(str(sweep_yaml(out="failed")), None, log=lambda *_: None)
    failed = tmp_path / "failed"
    last = max(int(row.split(",")[0]) for row in (whole / "losses.csv").read_text().splitlines()[1:])
    assert last % 2 and torch.load(failed / "checkpoint.pt", weights_only=False)["micro_steps"] == last  # not a periodic one
    monkeypatch.setattr(results, "finish", finish)
    assert tune(None, str(failed), log=lambda *_: None) == 0
    assert (failed / "losses.csv").read_text() == (whole / "losses.csv").read_text()
    assert (failed / "leaderboard.csv").read_text() == (whole / "leaderboard.csv").read_text()
    assert not (failed / "checkpoint.pt").exists()
    for aid in ["rank2-lr0p001", "rank4-lr0p003"]:
        ours, theirs = (load_file(str(run / "adapters" / aid / "adapter_model.safetensors")) for run in (failed, whole))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_stopped_checkpoint_write_leaves_the_last_whole_checkpoint(tmp_path):
    """A stoppable write (a completed run's final checkpoint) stopped mid-way leaves the checkpoint
    before it as it was and no .tmp; one that finished stays written whatever stop() says after."""
    import threading

    from alto import checkpoint

    big = {"micro_steps": 9, "adapters": {}, "blob": torch.randn(1 << 22)}  # 16 MB: several writes
    checkpoint.write(tmp_path, {"micro_steps": 4, "adapters": {}})
    stop = threading.Event()
    stop.set()
    with pytest.raises(checkpoint.Stopped):
        checkpoint.write(tmp_path, big, stop)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["micro_steps"] == 4
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    writer = checkpoint.Writer(tmp_path)
    writer.write(big, stoppable=True)
    writer.wait()
    writer.stop()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["micro_steps"] == 9


def test_killed_run_resumes_to_the_same_final_weights(tmp_path, sweep_yaml):
    defaults = {"micro_batch_size": 2, "max_steps": 4, "grad_accum": 1, "target_modules": ["q_proj", "v_proj"],
                "dropout": 0.1}
    assert tune(str(sweep_yaml(out="whole", defaults=defaults, eval={"every": 1})), None, log=lambda *_: None) == 0
    # Killed after micro-step 3: the last checkpoint is at 2, step 3 (and its evaluation) logged but lost.
    interrupt(sweep_yaml(out="cut", defaults=defaults, eval={"every": 1}), 3)
    a, b = tmp_path / "whole", tmp_path / "cut"
    assert torch.load(b / "checkpoint.pt", weights_only=False)["micro_steps"] == 2
    assert max(int(row.split(",")[0]) for row in (b / "evals.csv").read_text().splitlines()[1:]) == 3
    assert not (b / "leaderboard.csv").exists()
    assert tune(None, str(b), log=lambda *_: None) == 0
    for name in ("losses.csv", "evals.csv", "steps.csv"):
        if name == "steps.csv":  # its seconds differ: the rows' micro-steps and sizes are the same
            cut = lambda path: [r.split(",")[:7] for r in path.read_text().splitlines()]  # noqa: E731
            assert cut(a / name) == cut(b / name)
        else:
            assert (a / name).read_text() == (b / name).read_text(), name
    from safetensors.torch import load_file
    for aid in ["rank2-lr0p001", "rank4-lr0p003", "rank2-lr0p003", "rank4-lr0p001"]:
        wa = load_file(str(a / "adapters" / aid / "adapter_model.safetensors"))
        wb = load_file(str(b / "adapters" / aid / "adapter_model.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (aid, k)


def test_resume_drops_a_log_line_cut_short_by_the_kill(tmp_path, sweep_yaml):
    """A kill mid-write leaves half a row at the end of losses.csv: the resume drops it (and the rows
    after the checkpoint) and the log ends as the uninterrupted run's."""
    defaults = {"micro_batch_size": 2, "max_steps": 5, "target_modules": ["q_proj", "v_proj"]}
    assert tune(str(sweep_yaml(out="whole", defaults=defaults)), None, log=lambda *_: None) == 0
    interrupt(sweep_yaml(out="cut", defaults=defaults), 3)
    with open(tmp_path / "cut" / "losses.csv", "a") as f:  # the checkpoint is at micro-step 2
        f.write("2,rank4-lr0p0")
    assert tune(None, str(tmp_path / "cut"), log=lambda *_: None) == 0
    assert (tmp_path / "whole" / "losses.csv").read_text() == (tmp_path / "cut" / "losses.csv").read_text()


def test_scientific_floats_without_a_dot_are_floats():
    # YAML 1.1 reads 1e-4 as a string; a sweep file means the number.
    sweep = parse_sweep("grid: {lr: [1e-4, 3E-3]}\ndefaults: {alpha: 1e1}")
    assert sorted(c.lr for c in sweep.adapters.values()) == [1e-4, 3e-3]
    assert all(c.alpha == 10.0 for c in sweep.adapters.values())


def test_default_sweep_is_valid():
    from alto.sweep import DEFAULT_SWEEP

    sweep = parse_sweep(DEFAULT_SWEEP)
    assert sweep.model == "smollm2" and len(sweep.adapters) == 8 and list(sweep.tasks) == ["trivia", "ai", "coding"]
    assert sweep.tasks["trivia"].eval.metric == "exact_match" and "trivia/rank4-lr0p0003" in sweep.adapters


def test_sigkilled_run_resumes_to_the_same_final_weights(tmp_path, sweep_yaml):
    """A real kill (SIGKILL at an arbitrary point after the first checkpoint), then --resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    defaults = {"micro_batch_size": 2, "max_steps": 30, "target_modules": ["q_proj", "v_proj"], "dropout": 0.1}
    whole = sweep_yaml(out="whole", defaults=defaults)
    assert tune(str(whole), None, log=lambda *_: None) == 0
    killed = sweep_yaml(out="killed", defaults=defaults)
    cmd = [sys.executable, "-c", "import sys; from alto.cli import main; sys.exit(main(sys.argv[1:]))",
           "tune", str(killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "leaderboard.csv").exists()
    assert tune(None, str(tmp_path / "killed"), log=lambda *_: None) == 0
    from safetensors.torch import load_file
    for aid in ["rank2-lr0p001", "rank4-lr0p003"]:
        wa = load_file(str(tmp_path / "whole" / "adapters" / aid / "adapter_model.safetensors"))
        wb = load_file(str(tmp_path / "killed" / "adapters" / aid / "adapter_model.safetensors"))
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (aid, k)
    assert (tmp_path / "whole" / "losses.csv").read_text() == (tmp_path / "killed" / "losses.csv").read_text()


# Kills the process in the middle of its checkpoint writer's second write (half a file written),
# once the run's steps have gone on past that checkpoint (the write is in the background).
DYING_WRITE = """
import os, signal, sys, time
from pathlib import Path
import alto.checkpoint as ck
real, calls = ck.write, []
def write(run_dir, state, stop=None):
    calls.append(state["micro_steps"])
    if len(calls) == 2:
        (run_dir / (ck.CHECKPOINT + ".tmp")).write_bytes(b"PK half a checkpoint")
        deadline = time.time() + 60
        while time.time() < deadline and max(int(r.split(",")[0]) for r in
                (run_dir / "losses.csv").read_text().splitlines()[1:]) <= state["micro_steps"] + 1:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    real(run_dir, state, stop)
ck.write = write
from alto.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_during_a_background_checkpoint_write_resumes_bit_identically(tmp_path, sweep_yaml):
    """Checkpoints are written by a background thread while the steps go on: killed in the middle of
    one, the run keeps its last whole checkpoint (the logs written past it are cut back on resume),
    and the resumed run ends as the uninterrupted one, weights and logs bit for bit."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    defaults = {"micro_batch_size": 2, "max_steps": 12, "target_modules": ["q_proj", "v_proj"], "dropout": 0.1}
    assert tune(str(sweep_yaml(out="whole", defaults=defaults, eval={"every": 3})), None, log=lambda *_: None) == 0
    killed = sweep_yaml(out="killed", defaults=defaults, eval={"every": 3})
    proc = subprocess.run([sys.executable, "-c", DYING_WRITE, "tune", str(killed)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    cut = tmp_path / "killed"
    assert torch.load(cut / "checkpoint.pt", weights_only=False)["micro_steps"] == 2  # the first; the second half-written
    assert (cut / "checkpoint.pt.tmp").is_file()
    assert max(int(r.split(",")[0]) for r in (cut / "losses.csv").read_text().splitlines()[1:]) > 5  # it went on
    assert tune(None, str(cut), log=lambda *_: None) == 0
    for name in ("losses.csv", "evals.csv", "leaderboard.csv"):
        assert (tmp_path / "whole" / name).read_text() == (cut / name).read_text(), name
    for aid in ["rank2-lr0p001", "rank4-lr0p003", "rank2-lr0p003", "rank4-lr0p001"]:
        wa = load_file(str(tmp_path / "whole" / "adapters" / aid / "adapter_model.safetensors"))
        wb = load_file(str(cut / "adapters" / aid / "adapter_model.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), aid


def test_timing_json_accounts_for_the_whole_wall_of_the_command(tmp_path, sweep_yaml):
    """alto tune as a user runs it, timed from outside: timing.json's phases (from the process's start)
    add up to its wall but for the process's end."""
    import subprocess
    import sys
    import time

    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "alto.cli", "tune", str(sweep_yaml())], capture_output=True, text=True)
    wall = time.time() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    seconds = json.loads((tmp_path / "run" / "timing.json").read_text())
    assert list(seconds) == list(PHASES) and seconds["startup"] > 0.2  # the interpreter and torch's import at least
    # what is left is the process's end (interpreter and torch teardown: seconds on a busy 2-core machine)
    assert sum(seconds.values()) <= wall < sum(seconds.values()) + max(3.0, 0.25 * wall)


# The console script in a process of its own, with an atexit handler that says whether the usual
# exit ran and, when a path is given, a thread of the caller's that writes that file a second after
# the run's last file (timing.json): still working when main() returns.
ENTRY = """import atexit, sys, threading, time
from pathlib import Path
atexit.register(lambda: print("atexit ran", flush=True))
late = sys.argv.pop()
if late != "none":
    def work():
        while not (Path(late).parent / "timing.json").exists():
            time.sleep(0.02)
        time.sleep(1.0)
        Path(late).write_text("written")
    threading.Thread(target=work, name="caller-work").start()
from alto.cli import entry
entry()
"""


def test_an_ended_alto_tune_leaves_at_once_but_waits_for_a_working_thread(tmp_path, sweep_yaml):
    """alto.cli.entry: after a tune its output is whole (the last line printed, leaderboard.csv) and the
    interpreter's teardown is skipped (the atexit handler never runs); with a thread still working the
    usual exit runs and waits for it (the file it writes is there), and under a profiler too (its file
    is written)."""
    import subprocess
    import sys

    fast = subprocess.run([sys.executable, "-c", ENTRY, "tune", str(sweep_yaml()), "none"], capture_output=True, text=True,
                          timeout=600)
    assert fast.returncode == 0, fast.stderr[-2000:]
    assert fast.stdout.splitlines()[-1].startswith("seconds: ") and "atexit ran" not in fast.stdout
    assert (tmp_path / "run" / "leaderboard.csv").read_text().count("\n") == 5  # a header and 4 adapters
    late = tmp_path / "waited" / "late.txt"
    waited = subprocess.run([sys.executable, "-c", ENTRY, "tune", str(sweep_yaml(out="waited")), str(late)],
                            capture_output=True, text=True, timeout=600)
    assert waited.returncode == 0, waited.stderr[-2000:]
    assert late.read_text() == "written" and waited.stdout.splitlines()[-1] == "atexit ran"
    profile = tmp_path / "tune.prof"  # a profiler's file, written at exit: the usual exit under it
    profiled = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "alto.cli", "tune",
                               str(sweep_yaml(out="profiled"))], capture_output=True, text=True, timeout=600)
    assert profiled.returncode == 0, profiled.stderr[-2000:]
    assert profile.stat().st_size > 0


def test_early_stopping_frees_slots_for_queued_configs(tmp_path, sweep_yaml):
    path = sweep_yaml(out="es", grid={"lr": [1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2]},
                      defaults={"micro_batch_size": 2, "max_steps": 6, "target_modules": ["q_proj", "v_proj"]},
                      monitor={"rule": "asha", "grace": 2, "eta": 2}, max_running=3)
    assert tune(str(path), None, log=lambda *_: None) == 0
    run = tmp_path / "es"
    decisions = (run / "decisions.csv").read_text().splitlines()[1:]
    assert len(decisions) >= 2 and all("asha rung" in d for d in decisions)
    rows = [r.split(",") for r in (run / "losses.csv").read_text().splitlines()[1:]]
    first_step = {}
    for micro_step, aid, *_ in rows:
        first_step.setdefault(aid, int(micro_step))
    assert len(first_step) == 6  # every queued configuration got a slot
    assert sorted(first_step.values())[3:] != [1, 1, 1]  # ... and the later ones only after stops
    assert max(sum(1 for r in rows if int(r[0]) == t) for t in range(1, 20)) <= 3  # never more than 3 slots
    statuses = [json.loads((run / "adapters" / a / "alto_adapter.json").read_text())["status"] for a in first_step]
    assert set(statuses) <= {"finished", "stopped-early"} and "stopped-early" in statuses


def test_grow_policy_gives_freed_samples_to_survivors(tmp_path, sweep_yaml):
    path = sweep_yaml(out="grow", grid={"lr": [1e-3, 2e-3, 3e-3, 5e-3]},
                      defaults={"micro_batch_size": 2, "max_steps": 5, "target_modules": ["q_proj"]},
                      monitor={"rule": "asha", "grace": 2, "eta": 2}, reclaim="grow")
    from pathlib import Path
    sweep = parse_sweep(path.read_text())
    run = SweepRun(sweep, Path(sweep.output))
    Path(sweep.output).mkdir()
    assert run.run(log=lambda *_: None)
    stopped = [a for a in run.registry if a.status.value == "stopped-early"]
    survivors = [a for a in run.registry if a.status.value == "finished"]
    assert stopped and survivors
    assert sum(a.extra_batch for a in survivors) == 2 * len(stopped)  # the samples per step are kept


def test_monitor_on_held_out_loss_end_to_end(tmp_path, sweep_yaml):
    path = sweep_yaml(out="ev", grid={"lr": [1e-3, 3e-2, 1e-5, 3e-3]},
                      defaults={"micro_batch_size": 2, "max_steps": 8, "target_modules": ["q_proj", "v_proj"]},
                      monitor={"rule": "asha", "grace": 2, "eta": 2, "signal": "eval", "eval_every": 2})
    from pathlib import Path
    sweep = parse_sweep(path.read_text())
    run = SweepRun(sweep, Path(sweep.output))
    Path(sweep.output).mkdir()
    assert run.run(log=lambda *_: None)
    evals = {a.id: a.eval_losses for a in run.registry}
    assert all(len(v) >= 2 for v in evals.values())  # evaluated every 2 micro-steps while running
    decisions = (Path(sweep.output) / "decisions.csv").read_text().splitlines()[1:]
    assert decisions and all("held-out" in d and ",4," in d for d in decisions)  # decided at eval 2
    stopped = [a for a in run.registry if a.status.value == "stopped-early"]
    kept = [a for a in run.registry if a.status.value == "finished"]
    assert stopped and min(evals[a.id][1] for a in kept) <= min(evals[a.id][1] for a in stopped)


def test_alto_rule_end_to_end(tmp_path, sweep_yaml):
    """rule alto through alto tune: at the first evaluation after 5% of 8 steps (micro-step 2) the
    best quarter by held-out loss goes on; every adapter is still exported and ranked."""
    path = sweep_yaml(out="alto", grid={"lr": [1e-3, 3e-2, 1e-5, 3e-3]}, eval={"every": 2},
                      defaults={"micro_batch_size": 2, "max_steps": 8, "target_modules": ["q_proj", "v_proj"]},
                      monitor={"rule": "alto"})
    assert main(["tune", str(path)]) == 0
    run = tmp_path / "alto"
    decisions = [line.split(",") for line in (run / "decisions.csv").read_text().splitlines()[1:]]
    assert len(decisions) == 3 and all(d[0] == "2" and d[3] == "alto" and "alto warm-up" in d[4] for d in decisions)
    records = {a: json.loads((run / "adapters" / a / "alto_adapter.json").read_text())
               for a in ("lr0p001", "lr0p03", "lr1e-05", "lr0p003")}
    kept = [a for a, r in records.items() if r["status"] == "finished"]
    assert len(kept) == 1 and records[kept[0]]["eval_losses"][0] == min(r["eval_losses"][0] for r in records.values())
    assert all(r["eval_steps"][0] == 2 for r in records.values())


# rule alto stops at the evaluation that copied the best; the median rule on training losses at a
# step after the last evaluation (grace 5, evaluations every 2), where the best copy is older
STOPS = {"at its best": ({"rule": "alto"}, [1e-3, 3e-2, 1e-5, 3e-3], 6),
         "after it": ({"rule": "median", "grace": 5}, [1e-3, 3e-2, 1e-5, 3e-3, 1e-2, 3e-4], 12)}


@pytest.mark.parametrize("when", list(STOPS))
def test_an_adapter_stopped_at_the_evaluation_that_copied_its_best_retires_with_that_copy(tmp_path, sweep_yaml,
                                                                                        monkeypatch, device, when):
    """Rule alto stops adapters right after the evaluation that copied their best weights to host
    memory (on a GPU, in the background: alto.state.HostCopies): their retirement takes that copy
    (the same tensors, nothing copied again). An adapter stopped steps after its best is copied
    anew. Either way the retired weights are exactly those the model held as the adapter left it."""
    from pathlib import Path

    from alto.train import Trainer
    from alto.sweep_run import quiet

    monitor, lrs, steps = STOPS[when]
    path = sweep_yaml(out="reuse", device=device.type, grid={"lr": lrs}, eval={"every": 2}, monitor=monitor,
                      defaults={"micro_batch_size": 2, "max_steps": steps, "target_modules": ["q_proj", "v_proj"]})
    sweep = parse_sweep(path.read_text())
    Path(sweep.output).mkdir()
    run = SweepRun(sweep, Path(sweep.output))
    in_model = {}
    retire = Trainer.retire

    def spy(self, outcomes, copies=None, weight_copies=None):
        for a, _, _ in outcomes:
            in_model[a.id] = self.model.adapter_weights(a.id)  # copies of the packs' rows, as they leave
        retire(self, outcomes, copies, weight_copies)

    monkeypatch.setattr(Trainer, "retire", spy)
    assert run.run(log=quiet)
    stopped = [a for a in run.registry if a.status.value == "stopped-early"]
    assert stopped
    for a in stopped:
        step, best = run.evaluation.best_weights[a.id]
        retired = run.trainer.retired[a.id]
        assert retired.optimizer["step"] == a.step and (retired.weights is best) == (step == a.step)
        assert retired.weights.keys() == in_model[a.id].keys()
        for path_, layer in in_model[a.id].items():
            assert all(torch.equal(retired.weights[path_][name], t.cpu()) for name, t in layer.items())
    reused = [a.id for a in stopped if run.evaluation.best_weights[a.id][0] == a.step]
    assert reused == [a.id for a in stopped] if when == "at its best" else len(reused) < len(stopped)
    run.finish(log=quiet)


def test_the_end_does_not_evaluate_again_weights_already_evaluated(tmp_path, sweep_yaml, monkeypatch):
    """An adapter the monitor stops at an evaluation point ends with the weights that evaluation
    scored, and one that finishes is evaluated in the step it finishes in, in the model: the end
    evaluates (and puts back) none of them, and each final held-out loss equals the same weights
    put back and evaluated again."""
    import csv
    from pathlib import Path

    from alto.evaluation import Evaluation, loaded
    from alto.registry import Status
    from alto.sweep_run import quiet

    path = sweep_yaml(out="again", grid={"lr": [1e-3, 3e-2, 1e-5, 3e-3]}, eval={"every": 2},
                      defaults={"micro_batch_size": 2, "max_steps": 5, "target_modules": ["q_proj", "v_proj"]},
                      monitor={"rule": "alto", "keep": 0.5})
    sweep = parse_sweep(path.read_text())
    Path(sweep.output).mkdir()
    run = SweepRun(sweep, Path(sweep.output))
    assert run.run(log=quiet)
    at_end = []
    evaluate = Evaluation.losses
    monkeypatch.setattr(Evaluation, "losses", lambda self, part: at_end.extend(a.id for a in part) or evaluate(self, part))
    run.finish(log=quiet)
    stopped = [a for a in run.registry if a.status == Status.STOPPED_EARLY]
    finished = [a for a in run.registry if a.status == Status.FINISHED]
    assert stopped and finished and all(a.eval_steps[-1] == a.micro_step for a in stopped)
    assert at_end == [] and len(finished) == 2 and all(a.last_loss is not None and a.micro_step == 5 for a in finished)
    with open(Path(sweep.output) / "evals.csv", newline="") as f:
        final = {r["adapter"]: float(r["eval_loss"]) for r in csv.DictReader(f) if r["weights"] == "last"}
    for a in stopped + finished:
        loss = a.last_loss if a.status == Status.FINISHED else a.eval_losses[-1]
        assert final[a.id] == float(f"{loss:.6f}")
        with loaded(run.model, {a.id: (a.config, run.final_weights(a.id))}):
            again = evaluate(run.evaluation, [a])[0]
        assert again == pytest.approx(loss, rel=1e-5)


def _early_and_end_exports(sweep_path, monkeypatch) -> tuple[dict, dict, list]:
    """Runs a sweep file with alto.export.AdapterExports spied on, then again with every adapter
    written at the end (start a no-op), asserting both runs' adapters/ byte for byte alike; returns
    the writes started early (adapter -> (step, its micro-step, its status then)), the reference's
    records and the adapters whose early write the end reused."""
    from pathlib import Path

    from alto.export import AdapterExports

    started, reused = {}, []
    start, finish = AdapterExports.start, AdapterExports.finish

    def spy_start(self, adapter, step, weights):
        started[adapter.id] = (step, adapter.micro_step, adapter.status.value)
        start(self, adapter, step, weights)

    def spy_finish(self, adapter, weights, step, outcome):
        if self.started(adapter.id):
            reused.append(adapter.id)
        finish(self, adapter, weights, step, outcome)

    monkeypatch.setattr(AdapterExports, "start", spy_start)
    monkeypatch.setattr(AdapterExports, "finish", spy_finish)
    assert tune(str(sweep_path), None, log=lambda *_: None) == 0
    monkeypatch.setattr(AdapterExports, "start", lambda *_: None)  # the reference: all written at the end
    monkeypatch.setattr(AdapterExports, "finish", finish)
    early_run = parse_sweep(sweep_path.read_text()).output
    end_run = f"{early_run}-at-end"
    reference = sweep_path.with_name(f"{sweep_path.stem}-at-end.yaml")
    reference.write_text(sweep_path.read_text().replace(early_run, end_run))
    assert tune(str(reference), None, log=lambda *_: None) == 0
    monkeypatch.undo()

    ours, theirs = Path(early_run) / "adapters", Path(end_run) / "adapters"
    records = {a.name: json.loads((theirs / a.name / "alto_adapter.json").read_text()) for a in theirs.iterdir()}
    assert sorted(p.name for p in ours.iterdir()) == sorted(records)  # no temporary folder left
    for aid in records:
        files = sorted(f.name for f in (theirs / aid).iterdir())
        assert sorted(f.name for f in (ours / aid).iterdir()) == files and "adapter_model.safetensors" in files
        for name in files:  # (each names its own run's base/)
            mine = (ours / aid / name).read_bytes().replace(early_run.encode(), end_run.encode())
            assert mine == (theirs / aid / name).read_bytes(), (aid, name)
    assert sorted(reused) == sorted(started)
    for aid, (step, _, _) in started.items():  # what was written early is what the end exports
        assert records[aid]["export_step"] == step, aid
    return started, records, reused


def test_adapters_settled_before_the_end_are_written_while_the_run_goes_on(tmp_path, sweep_yaml, monkeypatch):
    """An adapter whose export is settled (it ended, and no later evaluation can change which
    weights it exports) has its weights written in the background as it ends (alto.export.
    AdapterExports): those stopped early while the others train, those finishing while their last
    held-out passes run. Each early write is of the weights the end exports (their step), and the
    run folder is byte for byte the one of the same run with every adapter written at its end.
    Held-out losses every 3 micro-steps and ASHA on the training loss at micro-steps 2 and 4:
    adapters stopped at 4 have a best (of micro-step 3) that the end's evaluation of their last
    weights may still beat: not settled until then (a planted settled_export that takes their best
    as settled writes step 3 where the end exports 4)."""
    path = sweep_yaml(out="early", grid={"lr": [3e-3, 1e-2, 1e-5, 2e-2, 5e-3, 1e-4]}, eval={"every": 3},
                      defaults={"micro_batch_size": 2, "max_steps": 7, "target_modules": ["q_proj", "v_proj"]},
                      monitor={"rule": "asha", "grace": 2, "eta": 2, "signal": "train"})
    started, records, _ = _early_and_end_exports(path, monkeypatch)
    stopped = [a for a, r in records.items() if r["status"] == "stopped-early"]
    assert len(records) == 6 and stopped and len(stopped) < 6
    # stopped before any evaluation: written while the others still trained
    assert {a for a in stopped if not records[a]["eval_steps"]} == {a for a, s in started.items() if s[1] == 2} != set()
    # stopped with a best and last weights never evaluated: not written early
    assert any(a not in started and records[a]["eval_steps"][-1] != records[a]["micro_step"] for a in stopped)
    # finished with a best: written once their last weights' held-out loss was known
    assert all(started[a][1:] == (7, "finished") for a in records if a not in stopped)
    # No evaluation before the end: an adapter's last weights are its export whatever their held-out
    # loss, written from the step that finishes it, before its held-out passes (still "running" then).
    path = sweep_yaml(out="last", grid={"lr": [3e-3, 1e-2], "rank": [2, 4]})
    started, records, _ = _early_and_end_exports(path, monkeypatch)
    assert len(records) == 4 and all(started[a] == (3, 3, "running") for a in records)


# `alto tune` killed (SIGKILL) inside the first early export: half its weights file written, the
# steps gone on past the next checkpoint.
DYING_EXPORT = """
import os, signal, sys, time
import alto.export as ex
def write(folder, *args):
    (folder / "adapter_model.safetensors").write_bytes(b"half an adapter")
    losses = next(p for p in folder.parents if (p / "losses.csv").exists()) / "losses.csv"
    deadline = time.time() + 60
    while time.time() < deadline and max(int(r.split(",")[0]) for r in losses.read_text().splitlines()[1:]) < 5:
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)
ex._write_weights = write
from alto.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("tasks", [1, 2])
def test_a_kill_during_an_early_export_resumes_to_the_same_adapters(tmp_path, sweep_yaml, tasks):
    """Killed while adapters stopped early are being written in the background, the run leaves
    hidden temporary folders (in adapters/<task>/ with two tasks) and its checkpoints; resumed, it
    removes them and ends as the uninterrupted run, every adapter's files and the logs bit for bit."""
    import subprocess
    import sys

    lrs = [3e-3, 1e-2, 1e-5, 2e-2, 5e-3, 1e-4]
    sweep = dict(grid={"lr": lrs}, eval={"every": 3},
                 defaults={"micro_batch_size": 2, "max_steps": 7, "target_modules": ["q_proj", "v_proj"]},
                 monitor={"rule": "asha", "grace": 2, "eta": 2, "signal": "train"})
    if tasks == 2:
        sweep["tasks"] = [{"name": "one", "grid": {"lr": lrs[:3]}}, {"name": "two", "grid": {"lr": lrs[3:]}}]
    assert tune(str(sweep_yaml(out="whole", **sweep)), None, log=lambda *_: None) == 0
    killed = sweep_yaml(out="killed", **sweep)
    proc = subprocess.run([sys.executable, "-c", DYING_EXPORT, "tune", str(killed)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    whole, cut = tmp_path / "whole", tmp_path / "killed"
    assert list((cut / "adapters").rglob(".*.tmp"))  # the writes under way ...
    assert not list((cut / "adapters").rglob("alto_adapter.json"))  # ... and no adapter put in place
    assert torch.load(cut / "checkpoint.pt", weights_only=False)["micro_steps"] >= 2
    assert tune(None, str(cut), log=lambda *_: None) == 0
    for name in ("losses.csv", "evals.csv", "decisions.csv", "leaderboard.csv"):
        assert (whole / name).read_text() == (cut / name).read_text(), name
    files = sorted(p.relative_to(whole) for p in (whole / "adapters").rglob("*") if p.is_file())
    assert sorted(p.relative_to(cut) for p in (cut / "adapters").rglob("*") if p.is_file()) == files
    assert len({f.parent for f in files}) == 6
    for f in files:  # (each names its own run's base/)
        assert (cut / f).read_bytes().replace(str(cut).encode(), str(whole).encode()) == (whole / f).read_bytes(), f


def test_hugging_face_dataset_source(tmp_path):
    """data.source hf: a save_to_disk folder (a DatasetDict: the split is chosen) or data files
    through load_dataset; records need text or prompt + completion; bad names are clear errors."""
    datasets = pytest.importorskip("datasets")
    from alto.records import load_records

    def load_texts(*args):  # the records' fields
        return [next(iter(r.values())) if len(r) == 1 else r["prompt"] + r["completion"] for r, _ in load_records(*args)]

    folder = tmp_path / "ds"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"prompt": ["Q: hi\n", "Q: rank?\n"], "completion": ["A: hello", "A: 8"]}),
        "test": datasets.Dataset.from_dict({"prompt": ["Q: x\n"], "completion": ["A: y"]}),
    }).save_to_disk(str(folder))
    assert load_texts("hf", str(folder)) == ["Q: hi\nA: hello", "Q: rank?\nA: 8"]
    assert load_texts("hf", str(folder), "test") == ["Q: x\nA: y"]
    with pytest.raises(ValueError, match="data.split='validation' is not a split"):
        load_texts("hf", str(folder), "validation")
    files = tmp_path / "files"  # a folder of data files: load_dataset picks the json builder
    files.mkdir()
    (files / "rows.jsonl").write_text('{"text": "alpha beta"}\n{"text": "gamma"}\n')
    assert load_texts("hf", str(files)) == ["alpha beta", "gamma"]
    (files / "rows.jsonl").write_text('{"text": "alpha beta"}\n{"label": "x"}\n')
    with pytest.raises(ValueError, match=r"\[train\]\[1\] needs a 'text' field, 'prompt' and 'completion', 'messages', or 'prompt', 'chosen'"):
        load_texts("hf", str(files))


def test_alto_version_names_the_release(capsys):
    import importlib.metadata

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"alto {importlib.metadata.version('alto')} (torch {torch.__version__})"


def test_stop_after_counts_from_where_the_run_starts_and_says_how_to_continue(tmp_path, capsys, sweep_yaml):
    """--stop-after N: N micro-steps of this command, from 0 or from the checkpoint it resumes; it
    stops at a checkpoint of its own and prints the command that continues; the continued run ends
    with the adapters of an uninterrupted one."""
    defaults = {"micro_batch_size": 2, "max_steps": 6, "target_modules": ["q_proj", "v_proj"], "dropout": 0.1}
    extra = {"checkpoint_every": 10, "eval": {"every": 2}}
    assert tune(str(sweep_yaml(out="whole", defaults=defaults, **extra)), None, log=lambda *_: None) == 0
    capsys.readouterr()
    cut = tmp_path / "cut"
    assert main(["tune", str(sweep_yaml(out="cut", defaults=defaults, **extra)), "--stop-after", "2"]) == 0
    out = capsys.readouterr().out
    assert f"stopped at micro-step 2 (--stop-after 2), checkpoint written; continue with: alto tune --resume {cut}" in out
    assert torch.load(cut / "checkpoint.pt", weights_only=False)["micro_steps"] == 2
    assert main(["tune", "--resume", str(cut), "--stop-after", "2"]) == 0
    out = capsys.readouterr().out
    assert f"resumed {cut} at micro-step 2" in out and "stopped at micro-step 4 (--stop-after 2)" in out
    assert torch.load(cut / "checkpoint.pt", weights_only=False)["micro_steps"] == 4
    assert not (cut / "leaderboard.csv").exists()
    assert main(["tune", "--resume", str(cut)]) == 0
    assert (tmp_path / "whole" / "losses.csv").read_text() == (cut / "losses.csv").read_text()
    assert (tmp_path / "whole" / "evals.csv").read_text() == (cut / "evals.csv").read_text()
    from safetensors.torch import load_file
    for aid in ["rank2-lr0p001", "rank4-lr0p003"]:
        wa = load_file(str(tmp_path / "whole" / "adapters" / aid / "adapter_model.safetensors"))
        wb = load_file(str(cut / "adapters" / aid / "adapter_model.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), aid


def test_held_out_losses_are_written_and_printed_as_they_happen(tmp_path, sweep_yaml):
    """evals.csv holds every evaluation when it is printed (not only at the end), with the losses the
    adapters record; the end adds each adapter's last weights' evaluation."""
    import csv

    run = tmp_path / "run"
    seen: dict[int, list[dict]] = {}
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if line.startswith("eval at step "):  # the file already holds this evaluation's rows
            step = int(line.split()[3])
            with open(run / "evals.csv") as f:
                seen[step] = [r for r in csv.DictReader(f) if int(r["micro_step"]) == step]

    defaults = {"micro_batch_size": 2, "max_steps": 5, "target_modules": ["q_proj", "v_proj"]}
    assert tune(str(sweep_yaml(defaults=defaults, eval={"every": 2})), None, log=log) == 0
    assert sorted(seen) == [2, 4] and all(len(rows) == 4 for rows in seen.values())
    with open(run / "evals.csv") as f:
        rows = list(csv.DictReader(f))
    for aid in ["rank2-lr0p001", "rank2-lr0p003", "rank4-lr0p001", "rank4-lr0p003"]:
        record = json.loads((run / "adapters" / aid / "alto_adapter.json").read_text())
        during = [r for r in rows if r["adapter"] == aid and r["weights"] == "current"]
        assert [float(r["eval_loss"]) for r in during] == pytest.approx(record["eval_losses"], abs=1e-6)
        assert [int(r["adapter_step"]) for r in during] == [2, 4]
        end = [r for r in rows if r["adapter"] == aid and r["weights"] == "last"]
        assert len(end) == 1 and end[0]["micro_step"] == "5" and end[0]["task"] == "t"
    best = min((r for r in rows if r["micro_step"] == "2"), key=lambda r: float(r["eval_loss"]))
    line = next(x for x in lines if x.startswith("eval at step 2 "))
    assert f"t: best {best['adapter']} {float(best['eval_loss']):.4f} (its step 2), 4 of 4 left" in line


def test_each_step_shows_every_task_s_best_and_median_loss_and_the_time_left(tmp_path, sweep_yaml):
    import csv
    import statistics

    lines: list[str] = []
    tasks = [{"name": "a", "grid": {"rank": [2, 4], "lr": [1e-3, 3e-3]}}, {"name": "b", "grid": {"lr": [1e-3]}}]
    assert tune(str(sweep_yaml(tasks=tasks, grid=None)), None, log=lines.append) == 0
    steps = [x for x in lines if x.startswith("step ")]
    assert len(steps) == 3
    losses = {}
    with open(tmp_path / "run" / "losses.csv") as f:
        for r in csv.DictReader(f):
            losses.setdefault((int(r["micro_step"]), r["adapter"].split("/")[0]), []).append(float(r["loss"]))
    for i, line in enumerate(steps, 1):
        a, b = losses[(i, "a")], losses[(i, "b")]
        assert f"a: best {min(a):.4f} median {statistics.median(a):.4f}" in line, line
        assert f"b: best {min(b):.4f} median {statistics.median(b):.4f}" in line, line
        assert "running 5 | queued 0 | stopped 0 | finished 0" in line or i == 3, line
        assert "left" in line, line  # predicted from the first measured step on
    assert steps[-1].split(", ~")[1].startswith("0s left")


def test_a_terminal_gets_a_progress_bar(tmp_path, capsys, sweep_yaml):
    assert tune(str(sweep_yaml()), None, bar=True) == 0
    out = capsys.readouterr().out
    assert "%|" in out and "3/3" in out and "left" in out and "step    1 |" not in out


def test_host_copies_hold_the_weights_as_they_were_when_asked(device):
    """A best checkpoint's host copy, made in the background (alto.state.HostCopies), holds the
    weights of the moment it was asked for, though the next steps change them at once."""
    from alto.state import HostCopies

    torch.manual_seed(0)
    weights = {f"model.layers.{i}.self_attn.q_proj": {"lora_A": torch.randn(r, 24, device=device),
                                                     "lora_B": torch.randn(r, 40, device=device)}
               for i, r in enumerate((3, 8, 1))}
    want = {p: {n: t.cpu().clone() for n, t in layer.items()} for p, layer in weights.items()}
    copies = HostCopies()
    pending = [copies.weights(weights) for _ in range(3)]
    for layer in weights.values():  # the next optimizer steps, queued right after
        for t in layer.values():
            t.mul_(-2).add_(1)
    for future in pending:
        got = future.result()
        assert got.keys() == want.keys()
        for p, layer in want.items():
            for n, t in layer.items():
                assert got[p][n].device.type == "cpu" and torch.equal(got[p][n], t), (p, n)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_copies_to_host_memory_through_the_staging_buffer_are_exact(monkeypatch, dtype):
    """alto.state.to_host (retirements, checkpoints, best weights): a staging buffer smaller than
    the tensor (odd sizes: the last piece is short) gives back every element where it was."""
    from alto import state

    monkeypatch.setattr(state, "STAGING_BYTES", 7 * 1024 + 12)
    side = torch.cuda.Stream()  # as HostCopies' thread copies: on a stream of its own
    for shape in [(0,), (5,), (37, 129), (3, 1001, 7)]:
        t = (torch.randn(shape, device="cuda") * 1000).to(dtype)
        for view in (t, t[1:], t.transpose(0, -1)):  # an offset, and a view that is not contiguous
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                got = state.to_host(view)
            want = view.cpu()
            assert got.device.type == "cpu" and not got.is_pinned() and got.dtype == dtype, shape
            assert got.shape == want.shape and torch.equal(got, want), shape


def test_losses_png_is_drawn_by_a_process_of_its_own(tmp_path):
    """alto.loss_plot.LossPlot: a process started with the run draws losses.png from the losses it is
    handed (a failure raised as one line naming the file); one never handed any leaves when close()
    closes its stdin."""
    from alto.loss_plot import LossPlot
    from alto.registry import AdapterConfig, Registry, Status

    reg = Registry()
    for aid, losses in [("a", [3.0, 2.5, float("nan")]), ("b", [3.1, 2.0])]:
        reg.add(aid, AdapterConfig(rank=2, alpha=4, lr=1e-3)).losses.extend(losses)
    reg["a"].status = Status.STOPPED_EARLY
    LossPlot().draw(reg, tmp_path / "losses.png")
    assert (tmp_path / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "losses.png").stat().st_size > 10_000
    with pytest.raises(RuntimeError, match=r"drawing losses.png failed: FileNotFoundError: .*No such file"):
        LossPlot().draw(reg, tmp_path / "gone" / "losses.png")
    waiting = LossPlot()
    waiting.close()
    assert waiting._proc.returncode == 0  # left on its own (stdin closed), not killed


def test_evaluation_passes_hold_a_few_times_the_largest_steps_positions(tmp_path, sweep_yaml, monkeypatch):
    """An evaluation's forward keeps no activations for a backward: its passes (held-out losses,
    greedy decoding) hold up to forward_only_factor times the largest step's token positions (4 at
    16 layers and more, none more below 8), in fewer passes, with the losses of one pass per sample."""
    import csv

    from alto import evaluation
    from alto.evaluation import forward_only_factor
    from conftest import TINY_LLAMA

    assert [forward_only_factor(n) for n in (1, 2, 4, 7, 8, 12, 16, 30, 80)] == [1, 1, 1, 1, 2, 3, 4, 4, 4]
    passes = []
    held_out_means = evaluation.held_out_means

    def counted(*args, **kwargs):
        passes.append(args[4])  # max_positions
        return held_out_means(*args, **kwargs)

    monkeypatch.setattr(evaluation, "held_out_means", counted)
    model = {"random_llama": {**TINY_LLAMA, "num_hidden_layers": 8}}
    runs = {}
    for factor in (None, 1):
        if factor:
            monkeypatch.setattr(evaluation, "forward_only_factor", lambda layers: factor)
        out = f"factor{factor}"
        path = sweep_yaml(out=out, model=model, eval={"every": 2, "samples": 8})
        sweep = parse_sweep(path.read_text())
        from pathlib import Path
        Path(sweep.output).mkdir()
        run = SweepRun(sweep, Path(sweep.output))
        assert run.run(log=lambda *_: None)
        run.finish(log=lambda *_: None)
        ev = run.evaluation
        assert ev.positions() == max((factor or 2) * ev.largest_step, 24) and passes[-1] == ev.positions()
        with monkeypatch.context() as m:  # logits computed whole (a soft-capped head's): no more than a step's
            m.setattr(type(run.model), "plain_head", None)
            assert ev.positions() == max(ev.largest_step, 24)
        with open(Path(sweep.output) / "evals.csv", newline="") as f:
            runs[factor] = [(r["adapter"], r["micro_step"], float(r["eval_loss"])) for r in csv.DictReader(f)]
    assert [r[:2] for r in runs[None]] == [r[:2] for r in runs[1]]
    assert all(a[2] == pytest.approx(b[2], rel=1e-5) for a, b in zip(runs[None], runs[1]))


def test_a_run_stopped_and_run_on_in_one_process_exports_what_one_run_does(tmp_path, sweep_yaml):
    """run(until) stops at a checkpoint: the exports it had started are dropped (nothing half-written
    left) and started again by the run that goes on, whose folder then holds what one uninterrupted
    run's does."""
    from pathlib import Path

    sweep = dict(grid={"lr": [3e-3, 1e-2, 1e-5, 2e-2]}, eval={"every": 3},
                 defaults={"micro_batch_size": 2, "max_steps": 5, "target_modules": ["q_proj", "v_proj"]},
                 monitor={"rule": "asha", "grace": 2, "eta": 2, "signal": "train"})
    assert tune(str(sweep_yaml(out="whole", **sweep)), None, log=lambda *_: None) == 0
    parsed = parse_sweep(sweep_yaml(out="twice", **sweep).read_text())
    Path(parsed.output).mkdir()
    run = SweepRun(parsed, Path(parsed.output))
    assert not run.run(until=3, log=lambda *_: None)  # past the stops at micro-step 2
    assert not list((tmp_path / "twice" / "adapters").rglob("*"))
    assert run.run(log=lambda *_: None)
    run.finish(log=lambda *_: None)
    whole, twice = tmp_path / "whole" / "adapters", tmp_path / "twice" / "adapters"
    files = sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file())
    assert files and sorted(p.relative_to(twice) for p in twice.rglob("*") if p.is_file()) == files
    for f in files:  # (each names its own run's base/)
        assert (twice / f).read_bytes().replace(b"/twice/", b"/whole/") == (whole / f).read_bytes(), f
