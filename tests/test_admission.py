"""Admission by memory and out-of-memory recovery, on the CPU: a memory budget admits only what
the peak model says fits (and the rest later), and an out-of-memory step, injected at a chosen
step, is undone with every adapter's state unchanged, sends the most recently admitted half back
to the queue and still ends with the same adapters as a run without it."""
import csv
import functools
import json

import pytest
import torch

from alto.admission import Admission, admission_order, fit_probes
from alto.loss import fused_head_step_bytes
from alto.registry import Adapter, AdapterConfig, Status
from alto.sched.catalog import ModelShape
from alto.sched.memory import PeakModel
from alto.sweep import parse_sweep
from alto.sweep_run import SweepRun
from conftest import TINY_LLAMA, write_word_records


def make_sweep(tmp_path, out: str, **extra):
    data = write_word_records(tmp_path / "data.jsonl", max_words=6)
    doc = {"name": "t", "model": {"random_llama": TINY_LLAMA}, "base": {"dtype": "float64"}, "device": "cpu",
           "checkpoint_every": 2, "output": str(tmp_path / out),
           "data": {"source": "jsonl", "path": str(data), "max_length": 24, "eval_fraction": 0.2},
           "defaults": {"micro_batch_size": 2, "max_steps": 4, "lr": 3e-3, "target_modules": ["q_proj", "v_proj"]},
           "adapters": [{"id": "a", "rank": 4, "micro_batch_size": 4}, {"id": "b", "rank": 2, "grad_accum": 2},
                        {"id": "c", "rank": 8, "dropout": 0.2}, {"id": "d", "rank": 2, "micro_batch_size": 1}],
           **extra}
    return parse_sweep(json.dumps(doc))


def run_of(sweep, tmp_path, out):
    (tmp_path / out).mkdir(exist_ok=True)
    return SweepRun(sweep, tmp_path / out)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_admission_order_is_largest_micro_batch_first_and_stable():
    adapters = [Adapter(aid, AdapterConfig(micro_batch_size=m)) for aid, m in [("x", 1), ("y", 4), ("z", 2), ("w", 4)]]
    assert [a.id for a in admission_order(adapters)] == ["y", "w", "z", "x"]


def test_the_peak_model_fits_measured_points_and_only_ever_rises():
    truth = PeakModel(1e9, 2e5, 12.0)
    points = [(t, p, truth.predict(t, p)) for t in (1000, 4000) for p in (10**6, 4 * 10**6)]
    fitted = PeakModel.fit(points, optimizer_bytes=8)
    assert fitted.fixed == pytest.approx(1e9) and fitted.per_token == pytest.approx(2e5)
    assert fitted.per_param == pytest.approx(20.0)  # 12 measured + the 8 bytes of AdamW moments
    raised = fitted.raised_to(5000, 10**6, 5e9)
    assert raised.predict(5000, 10**6) == pytest.approx(5e9)
    assert raised.raised_to(10, 10, 0.0) is raised  # a lower measurement changes nothing


def test_the_fused_heads_chunks_are_fitted_apart_from_the_linear_terms():
    """A small GPU's probe steps (256 and 1,024 tokens) of a 1B-widths model (128k vocab): the fused
    head's chunk of logits holds all 240 then all 1,008 target rows, and 1,024 rows beyond. fit_probes
    takes it off the peaks, recovers the linear truth and adds it back; fitted as a slope (0.25 MB a
    token) it would predict gigabytes more than a 20k-token step holds."""
    head = functools.partial(fused_head_step_bytes, hidden=2048, vocab=128256, itemsize=2)
    truth = PeakModel(2.5e9, 7e5, 12.0)
    sequences = 16
    points = [(t, t - sequences, p, truth.predict(t, p) + head(t - sequences))
              for t in (256, 1024) for p in (10**6, 4 * 10**6)]
    fitted = fit_probes(points, head)
    assert fitted.fixed == pytest.approx(2.5e9) and fitted.per_token == pytest.approx(7e5)
    assert fitted.per_param == pytest.approx(12.0 + 8)  # the AdamW moments a probe does not allocate
    assert fitted.head is head
    step = (20000, 8 * 10**6)
    assert fitted.predict(*step) == pytest.approx(truth.predict(*step) + 8 * step[1] + head(20000))
    assert head(20000) == 1024 * 128256 * 2 and head(1008) == 1008 * 128256 * 2
    as_slope = fit_probes(points, None)
    assert as_slope.predict(*step) - fitted.predict(*step) > 3e9
    raised = fitted.raised_to(*step, fitted.predict(*step) + 1e9)  # a higher measured peak
    assert raised.head is head and raised.predict(*step) == pytest.approx(fitted.predict(*step) + 1e9)
    assert head(0) == 0


def test_the_head_term_is_there_only_where_steps_run_the_fused_head(monkeypatch):
    """fused_head_bytes: on CUDA with liger and a plain LM head (alto.step's condition for the fused
    head); not on the CPU, nor for a head whose logits are soft-capped (the blocked loss runs there)."""
    from alto import admission as adm
    from alto.model import MultiLoraModel
    from conftest import tiny_model

    model = MultiLoraModel(tiny_model("Llama"))
    shape = ModelShape.from_hf_config(model.model.config)
    assert adm.fused_head_bytes(model, shape, torch.device("cpu")) is None
    monkeypatch.setattr(adm, "fused_head_available", lambda device: True)
    head = adm.fused_head_bytes(model, shape, torch.device("cuda"))
    rows = 37
    assert head(rows) == fused_head_step_bytes(rows, shape.hidden, shape.vocab, next(model.parameters()).element_size())
    model.model.config.final_logit_softcapping = 30.0
    assert model.plain_head is None and adm.fused_head_bytes(model, shape, torch.device("cuda")) is None


def test_no_probe_step_where_everything_planned_fits_twice_over(tmp_path):
    """ample: every planned adapter's step at once, its estimate above the held bytes doubled, fits
    the capacity (no admission can then depend on a measured peak), or not. What a run plans at once
    (SweepRun.planned_everything), every sequence max_length long: a grid's adapters at their own
    micro-batches and parameters; a search's trials each at the largest its space allows."""
    from alto.admission import ample
    from alto.sched.memory import adapter_params

    analytic = PeakModel(1e9, 1e5, 16.0)
    assert analytic.predict(1000, 10**6) == pytest.approx(1.116e9)
    assert ample(analytic, (1000, 10**6), capacity=1.232e9) and not ample(analytic, (1000, 10**6), capacity=1.231e9)
    assert ample(analytic, (0, 0), capacity=1e9) and not ample(analytic, (1, 0), capacity=1e9)
    run = run_of(make_sweep(tmp_path, "plan"), tmp_path, "plan")
    params = {aid: adapter_params(c, run.shape) for aid, c in run.sweep.adapters.items()}
    assert params["c"] == max(params.values()) > params["b"]  # rank 8, rank 2
    assert run.planned_everything() == ((4 + 2 + 2 + 1) * 24, sum(params.values()))  # micro-batches x max_length 24
    space = {"rank": {"low": 2, "high": 8}, "lr": {"low": 1e-3, "high": 1e-2}, "micro_batch_size": [1, 3]}
    search = make_sweep(tmp_path, "search", grid=None, adapters=None, search={"trials": 5, "space": space})
    run = run_of(search, tmp_path, "search")
    assert run.planned_everything() == (5 * 3 * 24, 5 * params["c"])  # 5 trials at micro-batch 3 and rank 8
    data = str(tmp_path / "data.jsonl")  # two tasks: reclaim may give the short task's samples to the long one
    tasks = [{"name": "short", "data": {"path": data, "max_length": 12},
              "adapters": [{"id": "s", "rank": 2, "micro_batch_size": 3}]},
             {"name": "long", "data": {"path": data, "max_length": 24}, "adapters": [{"id": "l", "rank": 8}]}]
    run = run_of(make_sweep(tmp_path, "tasks", adapters=None, tasks=tasks), tmp_path, "tasks")
    assert run.planned_everything() == ((3 + 2) * 24, params["b"] + params["c"])  # (s: rank 2 as b; l: rank 8 as c)


@pytest.mark.cuda
def test_calibration_probes_only_where_everything_planned_may_not_fit(monkeypatch):
    """On a GPU: a run whose planned steps fit twice over runs no probe step (its first steps raise
    the estimate: Admission.observe); one that may not fit probes."""
    from alto import admission as adm
    from alto.model import MultiLoraModel
    from conftest import tiny_model

    model = MultiLoraModel(tiny_model("Llama").to("cuda"))
    shape = ModelShape.from_hf_config(model.model.config)
    probes = []
    real = adm._probe
    monkeypatch.setattr(adm, "_probe", lambda *a: probes.append(a) or real(*a))
    cfg = AdapterConfig(rank=4, micro_batch_size=2, target_modules=("q_proj", "v_proj"))
    small = Admission.calibrate(model, shape, {"default": [10, 20]}, True, cfg, 0, torch.device("cuda"),
                                everything=(1000, 10**5))
    assert probes == [] and small.peak.per_token == adm.activation_bytes_per_token(cfg, shape, 4)
    Admission.calibrate(model, shape, {"default": [10, 20]}, True, cfg, 0, torch.device("cuda"),
                        everything=(10**12, 10**5))
    assert len(probes) == 1


def test_a_memory_budget_admits_what_fits_and_the_rest_later(tmp_path):
    free = run_of(make_sweep(tmp_path, "free"), tmp_path, "free")
    adm = free.colocation.admission
    ordered = admission_order(Adapter(aid, cfg, t.name) for t in free.sweep.tasks.values()  # not yet proposed
                              for aid, cfg in t.adapters.items())
    assert adm.fits(ordered)  # the host's memory holds all four
    budget = (adm.predict(ordered[:2]) + adm.predict(ordered[:3])) / 2  # two fit, three do not
    sweep = make_sweep(tmp_path, "tight", memory_budget_gb=budget / 1e9)
    run = run_of(sweep, tmp_path, "tight")
    assert run.colocation.admission.capacity == pytest.approx(budget)
    assert run.run(log=lambda *_: None)
    assert all(a.status == Status.FINISHED for a in run.registry)
    steps = rows(tmp_path / "tight" / "steps.csv")
    assert max(int(r["adapters"]) for r in steps) == 2 and min(int(r["adapters"]) for r in steps) >= 1
    first = {r["adapter"]: int(r["micro_step"]) for r in reversed(rows(tmp_path / "tight" / "losses.csv"))}
    assert first["a"] == first["c"] == 1 and first["b"] > 1 and first["d"] > 1  # a (4 samples) and c (the larger rank) first
    assert all(float(r["padding_fraction"]) == 0.0 for r in steps)  # packed steps


def test_max_tokens_per_step_caps_the_co_located_set(tmp_path):
    run = run_of(make_sweep(tmp_path, "cap", max_tokens_per_step=2), tmp_path, "cap")
    assert run.run(log=lambda *_: None)
    assert {int(r["adapters"]) for r in rows(tmp_path / "cap" / "steps.csv")} == {1}  # one at a time, never none


def states(run):
    """Every adapter's state (in the model, or held back) as flat tensors."""
    t = run.trainer
    out = {}
    for a in run.registry:
        if a.id in t.model.configs:
            out[a.id] = t.export_states([a.id])[a.id].tensors()
        elif a.id in t.retired:
            out[a.id] = [x.clone() for x in t.retired[a.id].tensors()]
    return out


def test_an_out_of_memory_step_is_undone_and_the_run_goes_on(tmp_path):
    whole = run_of(make_sweep(tmp_path, "whole", max_running=4), tmp_path, "whole")
    assert whole.run(log=lambda *_: None)

    run = run_of(make_sweep(tmp_path, "oom", max_running=4), tmp_path, "oom")
    assert not run.run(until=3, log=lambda *_: None)
    before = states(run)
    b_grads = run.trainer.export_states(["b"])["b"].grads
    assert any(g.abs().sum() > 0 for g in b_grads)  # b (grad_accum 2) holds half an accumulation
    positions = {a.id: run.trainer.data[a.id].position for a in run.registry}

    def out_of_memory(_running):
        run.trainer.inject_fault = None  # once
        raise torch.OutOfMemoryError("injected")

    run.trainer.inject_fault = out_of_memory
    assert not run.run(until=4, log=lambda *_: None)
    after = states(run)
    assert before.keys() == after.keys() == set("abcd")
    for aid in before:  # weights, pending gradients, AdamW moments, step, data position, RNG: bit for bit
        assert all(torch.equal(x, y) for x, y in zip(before[aid], after[aid])), aid
        assert run.trainer.data[aid].position == positions[aid]
    # Admitted a, c, b, d (largest micro-batch first, then larger rank): the latest two go back.
    assert {a.id: a.status for a in run.registry} == {"a": Status.RUNNING, "b": Status.QUEUED,
                                                       "c": Status.RUNNING, "d": Status.QUEUED}
    decisions = rows(tmp_path / "oom" / "decisions.csv")
    assert [(r["adapter"], r["rule"]) for r in decisions] == [("b", "out-of-memory"), ("d", "out-of-memory")]
    assert "back to the queue" in decisions[0]["reason"]

    assert run.run(log=lambda *_: None)
    assert all(a.status == Status.FINISHED and a.failure is None for a in run.registry)
    assert [r["out_of_memory"] for r in rows(tmp_path / "oom" / "steps.csv")].count("1") == 1
    assert rows(tmp_path / "oom" / "steps.csv")[3]["out_of_memory"] == "1"
    for a in run.registry:  # the same trajectory as without the failed step (float64: to rounding)
        assert a.losses == pytest.approx(whole.registry[a.id].losses, rel=1e-10)
        for path, tensors in run.final_weights(a.id).items():
            for name, t in tensors.items():
                torch.testing.assert_close(t, whole.final_weights(a.id)[path][name], rtol=1e-10, atol=1e-12)


def test_an_adapter_out_of_memory_alone_fails_alone(tmp_path):
    run = run_of(make_sweep(tmp_path, "alone", max_running=1), tmp_path, "alone")

    def out_of_memory(running):
        if running[0].id == "b":
            raise torch.OutOfMemoryError("injected")

    run.trainer.inject_fault = out_of_memory
    assert run.run(log=lambda *_: None)
    status = {a.id: a.status for a in run.registry}
    assert status == {"a": Status.FINISHED, "b": Status.FAILED, "c": Status.FINISHED, "d": Status.FINISHED}
    assert "out of memory alone" in run.registry["b"].failure


def test_admission_never_leaves_a_rank_empty():
    shape = ModelShape(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vocab=100)
    adm = Admission(PeakModel(0.0, 1e9, 0.0), capacity=1.0, shape=shape, lengths={"default": (10, 0.0)})  # nothing fits
    queued = [Adapter(x, AdapterConfig()) for x in "pq"]
    assert adm.choose({0: [], 1: []}, queued, {}) == {"p": 0, "q": 1}
    assert adm.choose({0: queued[:1]}, queued[1:], {}) == {}


@pytest.mark.cuda
def test_a_sweep_that_starts_too_large_on_the_gpu_finishes(tmp_path):
    """A real CUDA out-of-memory error: the allocator is capped at 1.5 GB and eight adapters of four
    512-token sequences start together (max_running, no admission): the first step's 16k tokens
    need 2-3 GB of activations (4 layers of width 1024 keep ~190 KB per token, less with the fused
    layers: it fit in 3 GB with them on the H200), run out of memory, are undone and split until
    the step fits."""
    data = tmp_path / "long.jsonl"
    data.write_text("\n".join(json.dumps({"text": "abcdefgh " * 60}) for _ in range(40)))
    model = {"random_llama": {**TINY_LLAMA, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 4,
                              "vocab_size": 32000, "max_position_embeddings": 1024}}
    doc = {"name": "big", "model": model, "device": "cuda", "output": str(tmp_path / "big"), "max_running": 8,
           "data": {"source": "jsonl", "path": str(data), "max_length": 512, "eval_fraction": 0.0},
           "defaults": {"micro_batch_size": 4, "max_steps": 2},
           "adapters": [{"id": f"a{i}", "rank": 8, "seed": i} for i in range(8)]}
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.5e9 / torch.cuda.get_device_properties(0).total_memory)
    try:
        run = run_of(parse_sweep(json.dumps(doc)), tmp_path, "big")
        assert run.run(log=lambda *_: None)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert all(a.status == Status.FINISHED for a in run.registry)
    steps = rows(tmp_path / "big" / "steps.csv")
    assert steps[0]["out_of_memory"] == "1" and any(r["out_of_memory"] == "0" for r in steps)
    assert all(float(r["measured_peak_gb"]) <= 1.5 for r in steps if r["measured_peak_gb"])
