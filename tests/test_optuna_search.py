"""Search with Optuna (alto.optuna_search) through `alto tune`, on a tiny model on the CPU: a seeded
TPE study proposes trials into the slots ended adapters free (more adapters trained than run at
once), each told its best held-out loss; the study in the run folder is what Optuna itself reads;
a run killed between checkpoints resumes to the same trials and results as an uninterrupted one;
trials the monitor stops are pruned, with their held-out losses as intermediate values."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch

from alto.tune import tune
from conftest import interrupt

SPACE = {"rank": {"low": 2, "high": 8}, "lr": {"low": 1e-3, "high": 1e-2, "log": True}, "micro_batch_size": [1, 2]}


def search_sweep(sweep_yaml, out, **extra):
    return sweep_yaml(out=out, grid=None, max_running=2, eval={"every": 2, "samples": 4},
                      search={"sampler": "tpe", "trials": 6, "seed": 3, "parallel": 2, "space": SPACE}, **extra)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def study_of(run_dir):
    return optuna.load_study(study_name="t", storage=f"sqlite:///{run_dir / 'study.db'}")


def record(run_dir, aid):
    return json.loads((run_dir / "adapters" / aid / "alto_adapter.json").read_text())


def test_a_seeded_tpe_search_fills_freed_slots_and_tells_each_result(tmp_path, sweep_yaml):
    assert tune(str(search_sweep(sweep_yaml, "s")), None, log=lambda *_: None) == 0
    run = tmp_path / "s"
    trials = study_of(run).trials
    assert [t.number for t in trials] == list(range(6)) and all(t.state.name == "COMPLETE" for t in trials)
    board = {r["adapter"]: r for r in rows(run / "leaderboard.csv")}
    assert set(board) == {f"trial{t.number}" for t in trials}
    steps = rows(run / "steps.csv")
    assert max(int(r["adapters"]) for r in steps) == 2  # two at a time: six trained, four in freed slots
    first = {}
    for r in rows(run / "losses.csv"):
        first.setdefault(r["adapter"], int(r["micro_step"]))
    assert sorted(first.values())[:2] == [1, 1] and max(first.values()) > 3
    for t in trials:
        rec = record(run, f"trial{t.number}")
        config = rec["config"]
        assert (config["rank"], config["lr"], config["micro_batch_size"]) == (
            t.params["rank"], t.params["lr"], t.params["micro_batch_size"])
        assert config["seed"] == t.number and config["max_steps"] == 3  # the rest from the defaults
        assert t.value == rec["best"][1]  # told its best held-out loss
        assert t.intermediate_values == dict(zip(rec["eval_steps"], rec["eval_losses"]))
    assert len({(t.params["rank"], t.params["lr"]) for t in trials}) == 6  # the sampler's own proposals


def test_held_out_losses_reach_the_study_as_they_come(tmp_path, sweep_yaml):
    """A dashboard reading the study mid-run sees each running trial's held-out losses so far."""
    path = search_sweep(sweep_yaml, "live")
    assert tune(str(path), None, stop_after=5, log=lambda *_: None) == 0  # trials 2 and 3 run at micro-step 5
    running = [t for t in study_of(tmp_path / "live").trials if t.state.name == "RUNNING"]
    evals = [r for r in rows(tmp_path / "live" / "evals.csv")]
    assert running and all(t.intermediate_values for t in running)
    for t in running:
        assert list(t.intermediate_values.values()) == pytest.approx(  # evals.csv: 6 decimals
            [float(r["eval_loss"]) for r in evals if r["adapter"] == f"trial{t.number}"], abs=1e-6)


# A process killed inside a write to study.db: SQLite's rollback journal is left hot (pages spilled
# to the file mid-transaction), and the next connection would copy its pages back into the file.
KILLED_WRITE = """
import os, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA cache_size=1")
db.execute("BEGIN IMMEDIATE")
db.execute("UPDATE trials SET state = 'FAIL'")
db.execute("CREATE TABLE filler(x)")
db.executemany("INSERT INTO filler VALUES (?)", [(os.urandom(400),) for _ in range(3000)])
os._exit(9)
"""


def test_a_killed_search_resumes_to_the_uninterrupted_trials_and_results(tmp_path, sweep_yaml):
    assert tune(str(search_sweep(sweep_yaml, "whole")), None, log=lambda *_: None) == 0
    path = search_sweep(sweep_yaml, "cut")
    interrupt(path, 3)  # killed after micro-step 3, its last checkpoint at 2
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert len(saved["search"]["t"]["trials"]) == 2  # the first two, running at micro-step 2 ...
    assert len(study_of(tmp_path / "cut").trials) == 4  # ... told and two more asked at 3: forgotten on resume
    db = tmp_path / "cut" / "study.db"
    assert subprocess.run([sys.executable, "-c", KILLED_WRITE, str(db)]).returncode == 9  # ... and a write killed halfway
    assert Path(f"{db}-journal").stat().st_size > 0  # hot: the resume must not replay it onto the snapshot
    assert tune(None, str(tmp_path / "cut"), log=lambda *_: None) == 0
    whole, cut = study_of(tmp_path / "whole").trials, study_of(tmp_path / "cut").trials
    assert [(t.number, t.params, t.value, t.state, t.intermediate_values) for t in cut] == \
           [(t.number, t.params, t.value, t.state, t.intermediate_values) for t in whole]
    for name in ("losses.csv", "evals.csv", "leaderboard.csv"):
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "cut" / name).read_text(), name


def test_trials_the_monitor_stops_are_pruned_with_their_held_out_losses(tmp_path, sweep_yaml):
    path = search_sweep(sweep_yaml, "p", monitor={"rule": "asha", "grace": 2, "eta": 2, "signal": "eval"},
                        defaults={"micro_batch_size": 2, "max_steps": 8, "target_modules": ["q_proj", "v_proj"]})
    assert tune(str(path), None, log=lambda *_: None) == 0
    run = tmp_path / "p"
    board = {r["adapter"]: r["status"] for r in rows(run / "leaderboard.csv")}
    trials = {f"trial{t.number}": t for t in study_of(run).trials}
    stopped = [aid for aid, status in board.items() if status == "stopped-early"]
    assert stopped, "the monitor stopped nothing: the test would not see a pruned trial"
    for aid, t in trials.items():
        assert t.state.name == ("PRUNED" if aid in stopped else "COMPLETE"), aid
        rec = record(run, aid)
        assert t.intermediate_values == dict(zip(rec["eval_steps"], rec["eval_losses"]))
    assert all(trials[aid].value == trials[aid].intermediate_values[max(trials[aid].intermediate_values)]
               for aid in stopped)  # a pruned trial's value: its last held-out loss


def test_the_grid_sampler_runs_every_point_once(tmp_path, sweep_yaml):
    path = sweep_yaml(out="g", grid=None, eval={"every": 2, "samples": 4},
                      search={"sampler": "grid", "seed": 1, "space": {"rank": [2, 4], "lr": [1e-3, 3e-3]}})
    assert tune(str(path), None, log=lambda *_: None) == 0
    trials = study_of(tmp_path / "g").trials
    assert sorted((t.params["rank"], t.params["lr"]) for t in trials) == [(2, 1e-3), (2, 3e-3), (4, 1e-3), (4, 3e-3)]
    assert all(t.state.name == "COMPLETE" for t in trials)


@pytest.mark.parametrize("targets", [[["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]]])
def test_target_modules_are_searched_as_choices(tmp_path, sweep_yaml, targets):
    path = sweep_yaml(out="m", grid=None, eval={"every": 2, "samples": 4},
                      search={"sampler": "random", "trials": 4, "seed": 0, "space": {"target_modules": targets}})
    assert tune(str(path), None, log=lambda *_: None) == 0
    for t in study_of(tmp_path / "m").trials:
        assert record(tmp_path / "m", f"trial{t.number}")["config"]["target_modules"] == t.params["target_modules"].split(",")


def test_optunas_pruner_stops_trials_at_evaluation_points(tmp_path, sweep_yaml):
    path = sweep_yaml(out="pr", grid=None, max_running=2, eval={"every": 1, "samples": 4},
                      defaults={"micro_batch_size": 2, "max_steps": 6, "target_modules": ["q_proj", "v_proj"]},
                      search={"sampler": "tpe", "trials": 10, "seed": 3, "parallel": 2, "space": SPACE,
                              "pruner": "median"})
    assert tune(str(path), None, log=lambda *_: None) == 0
    run = tmp_path / "pr"
    decisions = {r["adapter"]: r for r in rows(run / "decisions.csv")}
    trials = {f"trial{t.number}": t for t in study_of(run).trials}
    pruned = {aid for aid, t in trials.items() if t.state.name == "PRUNED"}
    assert pruned, "the pruner stopped nothing: the test would not see it work"
    assert pruned == {aid for aid, d in decisions.items() if d["rule"] == "optuna-median"}
    for aid in pruned:
        t = trials[aid]
        steps = sorted(t.intermediate_values)
        assert int(decisions[aid]["adapter_micro_step"]) == steps[-1] and len(steps) < 6  # stopped where it was judged
        assert decisions[aid]["reason"].endswith(f"{t.intermediate_values[steps[-1]]:.4f}")
        # the median rule: worse there than the median of the trials asked before it that completed
        earlier = [o.intermediate_values[steps[-1]] for o in study_of(run).trials
                   if o.number < t.number and o.state.name == "COMPLETE" and steps[-1] in o.intermediate_values]
        assert t.intermediate_values[steps[-1]] > sorted(earlier)[(len(earlier) - 1) // 2]


def test_a_cma_es_search_runs_and_resumes_to_the_same_trials(tmp_path, sweep_yaml):
    space = {"rank": {"low": 2, "high": 8}, "lr": {"low": 1e-3, "high": 1e-2, "log": True}}
    extra = dict(grid=None, max_running=2, eval={"every": 2, "samples": 4},
                 search={"sampler": "cmaes", "trials": 6, "seed": 5, "parallel": 2, "space": space})
    assert tune(str(sweep_yaml(out="whole", **extra)), None, log=lambda *_: None) == 0
    path = sweep_yaml(out="cut", **extra)
    interrupt(path, 3)
    assert tune(None, str(tmp_path / "cut"), log=lambda *_: None) == 0
    whole, cut = study_of(tmp_path / "whole").trials, study_of(tmp_path / "cut").trials
    assert all(t.state.name == "COMPLETE" for t in whole) and len(whole) == 6
    assert [(t.params, t.value) for t in cut] == [(t.params, t.value) for t in whole]


@pytest.mark.parametrize("pruner", ["hyperband", "halving"])
def test_a_search_with_optunas_pruner_resumes_to_the_same_prunings(tmp_path, sweep_yaml, pruner):
    """Killed and resumed, Optuna's pruners prune the same trials at the same steps (the checkpoint
    keeps the pruner with the sampler; these two also re-derive their state from the study alone)."""
    extra = dict(grid=None, max_running=2, eval={"every": 1, "samples": 4},
                 defaults={"micro_batch_size": 2, "max_steps": 6, "target_modules": ["q_proj", "v_proj"]},
                 search={"sampler": "tpe", "trials": 8, "seed": 3, "parallel": 2, "pruner": pruner,
                         "space": {**SPACE, "max_steps": {"low": 3, "high": 8}}})
    assert tune(str(sweep_yaml(out="whole", **extra)), None, log=lambda *_: None) == 0
    interrupt(sweep_yaml(out="cut", **extra), 9)
    assert tune(None, str(tmp_path / "cut"), log=lambda *_: None) == 0
    whole, cut = study_of(tmp_path / "whole").trials, study_of(tmp_path / "cut").trials
    assert any(t.state.name == "PRUNED" for t in whole), "nothing pruned: the test would not see the pruner resume"
    assert [(t.params, t.state, t.intermediate_values) for t in cut] == \
           [(t.params, t.state, t.intermediate_values) for t in whole]


def test_the_cluster_plans_a_search_by_its_trials_and_largest_configuration(sweep_yaml):
    from alto.cluster import predicted_job
    from alto.sweep import parse_sweep

    path = sweep_yaml(out="c", grid=None, search={"trials": 7, "space": {"max_steps": {"low": 2, "high": 5}}})
    job, micro_steps = predicted_job("c", parse_sweep(path.read_text()), 1, 0.0, "H100")
    assert job.spec.configs == 7 and micro_steps == 5
