"""Multi-task sweeps: tenants with their own data co-located over one base (each adapter's
trajectory is PEFT's alone on its own completion-only data, float64), best held-out weights
exported (they equal a run stopped at that step), greedy decoding with co-located adapters (equal
to each adapter decoding alone with PEFT, no cache, no padding), kill and resume with tasks."""
import copy
import csv
import json
import random

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from alto.evaluation import evaluating  # noqa: E402
from alto.base import load_base  # noqa: E402
from alto.generate import greedy_completions  # noqa: E402
from alto.model import MultiLoraModel  # noqa: E402
from alto.sweep import parse_sweep  # noqa: E402
from alto.sweep_run import SweepRun, quiet  # noqa: E402
from alto.tune import tune  # noqa: E402
from conftest import TINY_LLAMA, WORDS, differences, interrupt, peft_alone  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def half(prediction: str, reference: str) -> float:
    """A user metric (eval.metric: test_tasks:half)."""
    return 0.5


def tasks_doc(tmp_path, out: str, **extra) -> dict:
    """Two tenants over one float64 random Llama: prompt/completion pairs (qa) and two-turn
    conversations (chat), each its own data, grid and defaults."""
    rng = random.Random(5)

    def words(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(lo, hi + 1)))

    qa, chat = tmp_path / "qa.jsonl", tmp_path / "chat.jsonl"
    qa.write_text("\n".join(json.dumps({"prompt": words(2, 4) + "?", "completion": " " + words(1, 2)}) for _ in range(30)))
    chat.write_text("\n".join(json.dumps({"messages": [
        {"role": r, "content": words(1, 3)} for r in ("user", "assistant", "user", "assistant")]}) for _ in range(30)))
    return {"name": "mt", "model": {"random_llama": TINY_LLAMA}, "base": {"dtype": "float64"}, "device": "cpu",
            "checkpoint_every": 2, "output": str(tmp_path / out), "max_running": 8,
            "data": {"source": "jsonl", "max_length": 48, "eval_fraction": 0.2},
            "defaults": {"micro_batch_size": 2, "max_steps": 4, "target_modules": ["q_proj", "v_proj"]},
            "eval": {"every": 1, "samples": 4},
            "tasks": [{"name": "qa", "data": {"path": str(qa)}, "grid": {"rank": [2, 4]}},
                      {"name": "chat", "data": {"path": str(chat)}, "grid": {"lr": [1e-3, 3e-3]},
                       "defaults": {"micro_batch_size": 3, "max_steps": 3,
                                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}], **extra}


def rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_multi_task_colocated_equals_each_adapter_alone_with_peft(tmp_path):
    sweep = parse_sweep(json.dumps(tasks_doc(tmp_path, "run")))
    (tmp_path / "run").mkdir()
    run = SweepRun(sweep, tmp_path / "run")
    assert run.run(log=quiet)
    assert {a.task for a in run.registry} == {"qa", "chat"}
    assert int(rows(tmp_path / "run" / "steps.csv")[0]["adapters"]) == 4  # both tasks in the same steps
    reference = load_base(sweep.model, "float64", torch.device("cpu")).model  # the same base, untouched
    for a in run.registry:
        seqs = [s.tolist() for s in run.trainer.data[a.id].sequences]
        assert any(t < 0 for s in seqs for t in s)  # prompts and user turns: seen, not learned
        fresh = MultiLoraModel(copy.deepcopy(reference))
        fresh.add_adapters({a.id: a.config})  # an adapter's init depends on its seed alone
        init = fresh.adapter_weights(a.id)
        losses, weights = peft_alone(reference, a.config, seqs, init, len(a.losses), run.base.pad_id)
        assert differences(a.id, a.losses, run.trainer.retired[a.id].weights, losses, weights) == []
        assert len(a.eval_losses) == len(a.losses) - 1  # every micro-step but the last (the end evaluates it)
    # the comparison sees the masks: PEFT on every token of the same sequences differs
    a = run.registry["chat/lr0p001"]
    every_token = [[t if t >= 0 else ~t for t in s.tolist()] for s in run.trainer.data[a.id].sequences]
    fresh = MultiLoraModel(copy.deepcopy(reference))
    fresh.add_adapters({a.id: a.config})
    losses, weights = peft_alone(reference, a.config, every_token, fresh.adapter_weights(a.id), len(a.losses),
                                 run.base.pad_id)
    assert differences(a.id, a.losses, run.trainer.retired[a.id].weights, losses, weights) != []


def test_best_export_is_the_best_held_out_state_and_equals_a_run_stopped_there(tmp_path):
    """Held-out answers unlike the trained ones (eval_path): the held-out loss turns up after two
    steps, and the exported adapter is the one of the lowest held-out loss, the same as an adapter
    trained only that far."""
    rng = random.Random(1)
    for name, n, answer in (("train", 24, " alpha gamma"), ("held", 8, " beta delta")):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(
            {"prompt": " ".join(rng.choice(WORDS) for _ in range(3)) + "?", "completion": answer}) for _ in range(n)))
    doc = tasks_doc(tmp_path, "best")
    doc["tasks"][0].update(grid={"rank": [4]}, defaults={"lr": 0.01, "max_steps": 10},
                           data={"path": str(tmp_path / "train.jsonl"), "eval_path": str(tmp_path / "held.jsonl")},
                           eval={"every": 1, "samples": 8, "metric": "test_tasks:half"})
    doc["tasks"][1]["eval"] = {"every": 1, "samples": 6, "metric": "exact_match", "max_new_tokens": 6}
    doc["tasks"][1]["data"]["max_length"] = 160  # whole conversations: a cut one has no reference to score
    (tmp_path / "best.yaml").write_text(json.dumps(doc))
    assert tune(str(tmp_path / "best.yaml"), None, log=quiet) == 0
    row = {r["adapter"]: r for r in rows(tmp_path / "best" / "leaderboards" / "qa.csv")}["qa/rank4"]
    record = json.loads((tmp_path / "best" / "adapters" / "qa" / "rank4" / "alto_adapter.json").read_text())
    k, losses = int(row["export_step"]), record["eval_losses"]  # losses[i]: after micro-step (= step) i + 1
    assert row["export"] == record["export"] == "best" and record["export_step"] == k and int(row["steps"]) == 10
    assert 0 < k < 10, "the held-out loss never turned up: the test would not tell best from last"
    assert record["eval_loss"] == min(losses) == losses[k - 1] == record["best"][1]
    assert float(row["eval_loss"]) == pytest.approx(min(losses), abs=1e-6)  # the CSV's 6 decimals
    assert float(row["metric_value"]) == 0.5 and row["metric"] == "test_tasks:half"
    chat = rows(tmp_path / "best" / "leaderboards" / "chat.csv")
    assert all(r["metric"] == "exact_match" and 0.0 <= float(r["metric_value"]) <= 1.0 for r in chat)
    assert [r["task"] for r in rows(tmp_path / "best" / "leaderboard.csv")].count("chat") == 2

    doc["output"] = str(tmp_path / "stopped")
    doc["tasks"][0].update(defaults={"lr": 0.01, "max_steps": k}, export="last")
    (tmp_path / "stopped.yaml").write_text(json.dumps(doc))
    assert tune(str(tmp_path / "stopped.yaml"), None, log=quiet) == 0
    stopped = {r["adapter"]: r for r in rows(tmp_path / "stopped" / "leaderboards" / "qa.csv")}["qa/rank4"]
    assert stopped["export"] == "last" and int(stopped["export_step"]) == k
    assert float(stopped["eval_loss"]) == pytest.approx(float(row["eval_loss"]), rel=1e-9)
    best = load_file(str(tmp_path / "best" / "adapters" / "qa" / "rank4" / "adapter_model.safetensors"))
    last = load_file(str(tmp_path / "stopped" / "adapters" / "qa" / "rank4" / "adapter_model.safetensors"))
    assert best.keys() == last.keys()
    for name in best:
        assert torch.allclose(best[name], last[name], rtol=1e-9, atol=1e-12), name


def test_killed_multi_task_run_resumes_to_the_same_exports(tmp_path):
    extra = {"monitor": {"rule": "asha", "grace": 2, "eta": 2, "signal": "eval", "eval_every": 1}, "eval": None}
    for out in ("whole", "cut"):
        (tmp_path / f"{out}.yaml").write_text(json.dumps(tasks_doc(tmp_path, out, **extra)))
    assert tune(str(tmp_path / "whole.yaml"), None, log=quiet) == 0
    interrupt(tmp_path / "cut.yaml", 3)
    assert tune(None, str(tmp_path / "cut"), log=quiet) == 0
    for name in ("leaderboard.csv", "losses.csv", "decisions.csv", "evals.csv", "leaderboards/qa.csv",
                 "leaderboards/chat.csv"):
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "cut" / name).read_text(), name
    for aid in ("qa/rank2", "qa/rank4", "chat/lr0p001", "chat/lr0p003"):
        a = load_file(str(tmp_path / "whole" / "adapters" / aid / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "cut" / "adapters" / aid / "adapter_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), aid


def peft_greedy(base_model, cfg, weights, prompt, new_tokens):
    """Greedy decoding with PEFT, one prompt, no cache, no padding: the full forward each token."""
    import peft

    lora = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules), bias="none")
    pm = peft.get_peft_model(copy.deepcopy(base_model), lora).eval()
    for path, tensors in weights.items():
        layer = pm.base_model.model.get_submodule(path)
        layer.lora_A["default"].weight.data.copy_(tensors["lora_A"])
        layer.lora_B["default"].weight.data.copy_(tensors["lora_B"].T)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(pm(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("bug", [None, "rows given to the wrong adapters"])
def test_colocated_greedy_decoding_equals_each_adapter_alone(bug, packed, monkeypatch):
    """Against PEFT's model of each adapter alone, one token at a time (float64); prompts read packed
    (a and b's prompts begin alike: their common prefix read once) or as left-padded rows."""
    from alto import generate
    from alto.registry import AdapterConfig

    base = load_base({"random_llama": {**TINY_LLAMA, "seed": 11}}, "float64", torch.device("cpu"))
    model = MultiLoraModel(copy.deepcopy(base.model))
    configs = {"a": AdapterConfig(rank=2, alpha=4, seed=1), "b": AdapterConfig(rank=5, alpha=5, seed=2),
               "c": AdapterConfig(rank=3, alpha=9, seed=3, target_modules=("q_proj", "k_proj", "o_proj", "up_proj"))}
    bases = {p: layer.base for p, layer in model.layers.items()}
    model.add_adapters(configs, {aid: {p: {"lora_A": torch.randn(c.rank, bases[p].in_features, dtype=torch.float64) * 0.3,
                                           "lora_B": torch.randn(c.rank, bases[p].out_features, dtype=torch.float64) * 0.3}
                                       for p in model.target_layers(c)}
                                 for aid, c in configs.items()})  # trained-looking adapters: B is not zero
    gen = torch.Generator().manual_seed(4)
    prefixes = {aid: torch.randint(1, 257, (n,), generator=gen).tolist() for aid, n in (("a", 6), ("b", 4), ("c", 0))}
    prompts = {aid: [prefixes[aid] + torch.randint(1, 257, (n,), generator=gen).tolist() for n in (1, 3, 9)]
               for aid in configs}
    expected = {aid: [peft_greedy(base.model, configs[aid], model.adapter_weights(aid), p, 7) for p in ps]
                for aid, ps in prompts.items()}
    shared = []  # packed: a and b's common prefixes read once where their prompts meet in a batch
    monkeypatch.setattr(generate, "shared_prefix_lengths",
                        lambda *a, f=generate.shared_prefix_lengths, **k: shared.append(f(*a, **k)) or shared[-1])
    if bug:
        plan_for = generate.plan_for
        monkeypatch.setattr(generate, "plan_for", lambda m, ids, lens, *a: plan_for(m, ids[::-1], lens[::-1], *a))
    with evaluating(model):
        together = greedy_completions(model, prompts, 7, set(), base.pad_id, torch.device("cpu"), 10_000, packed)
        in_pieces = greedy_completions(model, prompts, 7, set(), base.pad_id, torch.device("cpu"), 30, packed)
        stop = expected["b"][1][2]
        selected = []  # rows that reach the stop token leave the batch while the others decode on
        monkeypatch.setattr(transformers.DynamicCache, "batch_select_indices",
                            lambda c, keep, f=transformers.DynamicCache.batch_select_indices: selected.append(len(keep)) or f(c, keep))
        stopped = greedy_completions(model, prompts, 7, {stop}, base.pad_id, torch.device("cpu"), 10_000, packed)
    if bug:
        assert together != expected
        return
    assert together == expected and in_pieces == expected
    assert [s for s in shared if s] == ([[6, 4, 0]] * 2 if packed else [])  # together and stopped; in pieces a prompt is alone
    cut = {aid: [c[: c.index(stop)] if stop in c else c for c in cs] for aid, cs in expected.items()}
    assert stopped == cut and selected and min(selected) > 0


def test_multi_task_on_two_ranks_equals_one(tmp_path):
    """Rank-local adapter parallelism with tasks (2 CPU ranks over gloo): the task monitors' stops,
    the best weights (copied on the rank that evaluated them, collected on rank 0) and the exports are
    those of one rank."""
    extra = {"monitor": {"rule": "asha", "grace": 2, "eta": 2, "signal": "eval", "eval_every": 1}, "eval": None}
    for out in ("one", "two"):
        (tmp_path / f"{out}.yaml").write_text(json.dumps(tasks_doc(tmp_path, out, **extra)))
    assert tune(str(tmp_path / "one.yaml"), None, log=quiet) == 0
    assert tune(str(tmp_path / "two.yaml"), None, log=quiet, nproc=2) == 0
    one, two = rows(tmp_path / "one" / "leaderboard.csv"), rows(tmp_path / "two" / "leaderboard.csv")
    assert one == two and {r["status"] for r in one} == {"finished", "stopped-early"}
    for r in one:
        a = load_file(str(tmp_path / "one" / "adapters" / r["adapter"] / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "two" / "adapters" / r["adapter"] / "adapter_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), r["adapter"]
