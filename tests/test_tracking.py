"""Experiment tracking (report_to, alto.tracking), read back with the trackers' own readers:
TensorBoard's EventAccumulator and MLflow's client. Every adapter's training losses, learning
rates and held-out losses, its hyperparameters, and each step's seconds and adapters: the same
figures as losses.csv, evals.csv and steps.csv."""
import csv
import importlib.util

import pytest

from alto.tune import tune

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None or importlib.util.find_spec("mlflow") is None,
                                reason="tensorboard and mlflow-skinny are test extras")

IDS = ["rank2-lr0p001", "rank2-lr0p003", "rank4-lr0p001", "rank4-lr0p003"]


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_tracked(tmp_path, sweep_yaml, out, **extra):
    path = sweep_yaml(out=out, report_to=["tensorboard", "mlflow"], eval={"every": 2, "samples": 4},
                      defaults={"micro_batch_size": 2, "max_steps": 4, "target_modules": ["q_proj", "v_proj"],
                                "warmup_steps": 2}, **extra)
    assert tune(str(path), None, log=lambda *_: None) == 0
    return tmp_path / out


def expected(run_dir):
    """Each adapter's (micro-step, training loss) and (micro-step, held-out loss) from the CSV files."""
    train, held = {}, {}
    micro = {}
    for r in rows(run_dir / "losses.csv"):
        micro[r["adapter"]] = micro.get(r["adapter"], 0) + 1
        train.setdefault(r["adapter"], []).append((micro[r["adapter"]], float(r["loss"])))
    for r in rows(run_dir / "evals.csv"):
        if r["weights"] == "current":
            held.setdefault(r["adapter"], []).append(float(r["eval_loss"]))
    return train, held


def test_tensorboard_event_files_hold_every_adapters_curves(tmp_path, sweep_yaml):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = run_tracked(tmp_path, sweep_yaml, "tb")
    train, held = expected(run_dir)
    for aid in IDS:
        events = EventAccumulator(str(run_dir / "tensorboard" / "adapters" / aid))
        events.Reload()
        loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
        assert [s for s, _ in loss] == [s for s, _ in train[aid]]
        assert [v for _, v in loss] == pytest.approx([v for _, v in train[aid]], abs=1e-6)  # float32 events, 6-decimal CSV
        lrs = [e.value for e in events.Scalars("train/learning_rate")]
        lr = float(aid.split("lr")[1].replace("p", "."))
        assert lrs == pytest.approx([lr / 2, lr, lr, lr], rel=1e-6)  # warm-up over two steps, then constant
        assert [e.value for e in events.Scalars("eval/loss")] == pytest.approx(held[aid], abs=1e-6)
        assert "rank: " in events.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    sweep = EventAccumulator(str(run_dir / "tensorboard" / "sweep"))
    sweep.Reload()
    steps = rows(run_dir / "steps.csv")
    assert [e.value for e in sweep.Scalars("step/adapters")] == [float(r["adapters"]) for r in steps]
    assert len(sweep.Scalars("step/seconds")) == len(steps)


def test_mlflow_runs_nest_every_adapter_under_the_sweep_and_survive_a_resume(tmp_path, sweep_yaml):
    from mlflow.tracking import MlflowClient

    path = sweep_yaml(out="ml", report_to="mlflow", eval={"every": 2, "samples": 4})
    assert tune(str(path), None, stop_after=2, log=lambda *_: None) == 0
    assert tune(None, str(tmp_path / "ml"), log=lambda *_: None) == 0  # resumed: the same runs go on
    run_dir = tmp_path / "ml"
    train, held = expected(run_dir)
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("t")
    found = client.search_runs([experiment.experiment_id])
    runs = {r.data.tags["mlflow.runName"]: r for r in found}
    assert set(runs) == {"sweep", *IDS} and len(found) == 5  # the resumed process found its runs again
    parent = runs["sweep"].info.run_id
    for aid in IDS:
        run = runs[aid]
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.params["rank"] == aid[4] and run.data.params["task"] == "t"
        history = client.get_metric_history(run.info.run_id, "train/loss")
        latest = {}  # steps redone after the resume are logged again: the later value is the run's
        for m in sorted(history, key=lambda m: (m.step, m.timestamp)):
            latest[m.step] = m.value
        assert sorted(latest) == [step for step, _ in train[aid]]
        assert [latest[step] for step in sorted(latest)] == pytest.approx([v for _, v in train[aid]], abs=1e-6)
        evals = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/loss")}
        assert [evals[s] for s in sorted(evals)] == pytest.approx(held[aid], abs=1e-6)
        assert run.info.status == "FINISHED"
    assert client.get_metric_history(parent, "step/adapters")


def test_a_tracker_not_installed_or_unknown_is_one_line(tmp_path, sweep_yaml, capsys, monkeypatch):
    from alto.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["tune", str(sweep_yaml(report_to=["wandb"]))]) == 2
    assert "report_to: 'wandb' must be one of tensorboard, mlflow" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert main(["tune", str(sweep_yaml(report_to="mlflow"))]) == 2
    assert "report_to: mlflow is not installed: pip install mlflow-skinny" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
