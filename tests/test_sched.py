"""Scheduling: duration estimate, memory, intra-task packing, cluster policies, trace simulator."""
from __future__ import annotations

import pytest
from transformers import LlamaConfig

from alto.families import Llama
from alto.registry import AdapterConfig
from alto.sched import estimate
from alto.sched.catalog import ModelShape
from alto.sched.estimate import adapter_step_flops

LLAMA3_8B = ModelShape(hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, vocab=128256)


def test_model_shape_from_hf_config_and_params():
    cfg = LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    shape = ModelShape.from_hf_config(cfg)
    assert shape == LLAMA3_8B
    assert shape.projection_dims()["k_proj"] == (4096, 1024)
    assert shape.projection_dims()["down_proj"] == (14336, 4096)
    assert tuple(shape.projection_dims()) == Llama.names
    assert abs(shape.params() - 8.03e9) < 0.01e9  # Llama-3-8B has 8.03B parameters
    with pytest.raises(ValueError, match="kv_heads"):
        ModelShape(64, 2, 128, 4, 3, 100)


def test_adapter_step_flops_positive_deterministic_monotone():
    base = AdapterConfig(rank=8, micro_batch_size=2)
    f = adapter_step_flops(base, 256, LLAMA3_8B)
    assert f > 0 and f == adapter_step_flops(base, 256, LLAMA3_8B)
    assert adapter_step_flops(AdapterConfig(rank=16, micro_batch_size=2), 256, LLAMA3_8B) > f
    assert adapter_step_flops(AdapterConfig(rank=8, micro_batch_size=3), 256, LLAMA3_8B) > f
    assert adapter_step_flops(base, 257, LLAMA3_8B) > f
    # ~4 flops per weight per token dominate: 2 sequences of 256 tokens through 7.5B matmul weights.
    assert 0.9 < f / (4 * 512 * LLAMA3_8B.matmul_params()) < 1.1
    with pytest.raises(ValueError, match="seq_len"):
        adapter_step_flops(base, 0, LLAMA3_8B)


def test_estimate_error_on_measured_h100_steps():
    rows = {(r.kind, r.adapters): r for r in estimate.error_report()}
    assert len(rows) == 9
    fitted = [abs(r.fitted_ms - r.measured_ms) / r.measured_ms for r in rows.values() if r.kind != "loop"]
    assert max(fitted) < 0.25  # in-sample, every base/alto configuration
    # Held out, the interpolated configuration (8 adapters) and the large ones stay within 30%.
    for key in [("base", 8), ("base", 32), ("alto", 8), ("alto", 32)]:
        assert abs(rows[key].held_out_error) < 0.3, rows[key]
    m = estimate.default_model()
    assert 300e12 < 1 / m.seconds_per_flop < 989e12  # below the H100's peak, above a third of it


def test_job_estimate_learns_the_ratio_online():
    est = estimate.JobEstimate(predicted_step_s=1.0, smoothing=0.5)
    for _ in range(20):
        est.observe(1.5)
    assert est.step_seconds == pytest.approx(1.5, rel=1e-3)
    est.set_prediction(2.0)  # fewer configs now: the job's own bias carries over
    assert est.remaining_seconds(10) == pytest.approx(30.0, rel=1e-3)
    with pytest.raises(ValueError, match="measured_step_seconds"):
        est.observe(0.0)


def test_forecast_steps_the_running_adapters_and_fills_freed_slots_from_the_queue():
    cfg = AdapterConfig()
    work = lambda steps: estimate.Work(cfg, 16, steps)  # noqa: E731
    # two run (3 and 5 micro-steps left), the queued one (4) takes the first freed slot; a step costs
    # one second per adapter in it: 3 steps of 2, then 2 of 2 (the 5 with 2 left, the 4), then the 4's last 2 alone.
    steps, seconds = estimate.forecast([work(3), work(5)], [work(4)], 2, lambda step: float(len(step)))
    assert (steps, seconds) == (7, 3 * 2 + 2 * 2 + 2 * 1)
    # one slot: everything one after another
    assert estimate.forecast([work(3)], [work(5), work(4)], 1, lambda step: 10.0 * len(step)) == (12, 120.0)
    assert estimate.forecast([], [], 4, lambda step: 1.0) == (0, 0.0)
    # mixed sequence lengths: a step's prediction is the sum of each adapter's own FLOPs
    model, shape = estimate.default_model(), LLAMA3_8B
    mixed = model.step_seconds([cfg, cfg], [128, 512], shape)
    assert mixed == pytest.approx(model.step_seconds([cfg], 128, shape) + model.step_seconds([cfg], 512, shape)
                                  - model.step_overhead_s)


def test_intra_schedule_never_exceeds_memory_random_configs():
    import random

    from alto.sched.intra import schedule_task

    rng = random.Random(0)
    for trial in range(25):
        configs = [AdapterConfig(rank=rng.choice([4, 8, 16, 64, 256]), micro_batch_size=rng.choice([1, 2, 4, 8]),
                                 grad_accum=rng.choice([1, 2]), max_steps=rng.randint(5, 50),
                                 target_modules=tuple(rng.sample(Llama.names, rng.randint(1, 7))))
                   for _ in range(rng.randint(1, 12))]
        schedule = schedule_task(configs, rng.choice([256, 512, 1024]), LLAMA3_8B, rng.choice(["H100", "A100", "H200"]))
        assert sorted(schedule.admission_order) == list(range(len(configs)))
        assert schedule.peak_bytes <= schedule.capacity_bytes
        for e in schedule.entries:  # memory at every admission instant, from the timeline itself
            live = schedule.running_at(e.start_s)
            assert schedule.base_bytes + sum(x.bytes for x in live) <= schedule.capacity_bytes
            c = configs[e.index]  # the effective batch is preserved
            assert e.micro_batch_size * e.grad_accum == c.micro_batch_size * c.grad_accum


def test_intra_schedule_shrinks_micro_batch_and_orders_longest_first():
    from alto.sched.intra import schedule_task

    big = AdapterConfig(rank=16, micro_batch_size=8, max_steps=10, target_modules=Llama.names)
    short = AdapterConfig(rank=16, micro_batch_size=2, max_steps=5, target_modules=Llama.names)
    # At micro-batch 8 the two big configs and the short one need 94 GB of the H100's 68 usable.
    schedule = schedule_task([short, big, big], 512, LLAMA3_8B, "H100")
    assert schedule.admission_order[-1] == 0  # the longer configs first
    shrunk = [e for e in schedule.entries if e.micro_batch_size < 8 and e.index > 0]
    assert shrunk and all(e.micro_batch_size * e.grad_accum == 8 for e in shrunk)
    assert all(e.start_s == 0 for e in schedule.entries)  # after shrinking, all three fit together
    tiny = ModelShape(64, 2, 128, 4, 2, 100)
    with pytest.raises(ValueError, match="empty"):
        schedule_task([], 512, tiny)


# --- cluster simulator -----------------------------------------------------------------------------

def _tasks(rows):
    from alto.sched.inter import TraceTask

    return [TraceTask(*r) for r in rows]


def test_sjf_beats_fifo_when_a_short_task_queues_behind_a_long_one():
    from alto.sched.sim import simulate

    # One GPU: task a runs; b (long) and c (short) arrive while it does. SJF runs c before b.
    tasks = _tasks([(0, "a", "qwen2-0.5b", 1, 4_000_000, 1), (10, "b", "qwen2-0.5b", 1, 8_000_000, 1),
                    (20, "c", "qwen2-0.5b", 1, 400_000, 1)])
    fifo, sjf = (simulate(tasks, p, gpus=1, noise=0.0) for p in ("fifo", "sjf"))
    order = lambda r: [j.name for j in sorted(r.jobs, key=lambda j: j.finished)]
    assert order(fifo) == ["a", "b", "c"] and order(sjf) == ["a", "c", "b"]
    assert sjf.jct.mean() < fifo.jct.mean()
    assert sjf.makespan == pytest.approx(fifo.makespan)


def test_alto_packs_two_same_base_tasks_on_one_gpu():
    from alto.sched.sim import simulate

    # One GPU busy with a long task; a short task of the same base model joins it instead of waiting.
    tasks = _tasks([(0, "long", "qwen2-0.5b", 2, 20_000_000, 1), (60, "short", "qwen2-0.5b", 2, 1_000_000, 1)])
    alto, fifo = (simulate(tasks, p, gpus=1, noise=0.0) for p in ("alto", "fifo"))
    short = {r.policy: next(j for j in r.jobs if j.name == "short") for r in (alto, fifo)}
    assert short["alto"].queued == 0.0 and short["fifo"].queued > 0
    assert alto.jct.mean() < fifo.jct.mean()


def test_alto_reclaims_gpus_freed_by_early_termination():
    from alto.sched.sim import simulate

    # 4 configs on 4 GPUs; after the rungs 1 survives, so 3 GPUs go to the waiting task.
    tasks = _tasks([(0, "sweep", "llama-3.2-1b", 4, 40_000_000, 4), (5, "next", "qwen2-7b", 2, 2_000_000, 2)])
    alto, fifo = (simulate(tasks, p, gpus=4, noise=0.0) for p in ("alto", "fifo"))
    nxt = {r.policy: next(j for j in r.jobs if j.name == "next") for r in (alto, fifo)}
    assert nxt["alto"].finished < nxt["fifo"].finished
    assert alto.utilization > fifo.utilization


@pytest.mark.parametrize("policy", ["alto", "cpsat", "fifo", "sjf", "tiresias"])
def test_simulator_invariants_on_the_sample_trace(policy):
    from alto.sched import sim, trace

    tasks = trace.load_alto(trace.sample_path())
    r = sim.simulate(tasks, policy, gpus=8)  # placement and time checks raise inside on a violation
    assert all(j.finished is not None and j.finished >= j.spec.arrival_s for j in r.jobs)
    assert len(r.jobs) == len(tasks)
    times = [t for t, _ in r.timeline]
    assert times == sorted(times) and times[-1] == max(j.finished for j in r.jobs)  # ends with the last job
    assert all(0 <= busy <= 8 for _, busy in r.timeline)
    # The holds timeline: each task's GPU-seconds are the ones it attained; an exclusive GPU is never held twice at once.
    for j in r.jobs:
        assert sum(b - a for _, t, a, b in r.holds if t == j.name) == pytest.approx(j.attained, rel=1e-9, abs=1e-6)
    if r.jobs and sim.POLICIES[policy]().exclusive:
        for g in range(8):
            spans = sorted((a, b) for h, _, a, b in r.holds if h == g)
            assert all(b1 <= a2 + 1e-9 for (_, b1), (a2, _) in zip(spans, spans[1:]))
    assert 0 < r.utilization <= 1
    # No job finishes faster than alone on its GPUs (minus the noise factor it drew).
    w = sim.Workload()
    for j in r.jobs:
        alone = w.duration(j.shape, j.spec.configs, j.spec.tokens, j.spec.gpus) * j.true_ratio
        assert j.finished - j.spec.arrival_s >= alone * 0.99


def test_cpsat_reaches_the_makespan_bound_that_the_greedy_policies_miss():
    """3 GPUs; a and b ask 2 GPUs each (they can never overlap), c and d 1. The makespan cannot be
    below a's time plus b's; the constraint program reaches it (c and d run beside a, then b).
    FIFO puts c and d after b, SJF and alto start the short c and d first and delay a. It plans
    the same on every run (a deterministic work limit)."""
    from alto.sched.sim import simulate

    tasks = _tasks([(0, "a", "qwen2-0.5b", 2, 4_000_000, 2), (0, "b", "qwen2-0.5b", 2, 4_000_000, 2),
                    (0, "c", "qwen2-0.5b", 1, 2_000_000, 1), (0, "d", "qwen2-0.5b", 1, 2_000_000, 1)])
    runs = {p: simulate(tasks, p, gpus=3, noise=0.0) for p in ("cpsat", "fifo", "sjf", "alto")}
    makespan = {p: max(j.finished for j in r.jobs) for p, r in runs.items()}
    a = next(j for j in runs["cpsat"].jobs if j.name == "a")
    assert a.queued == 0 and makespan["cpsat"] == pytest.approx(2 * a.finished, rel=1e-9)  # the bound
    assert all(makespan[p] > makespan["cpsat"] * 1.05 for p in ("fifo", "sjf", "alto"))
    again = simulate(tasks, "cpsat", gpus=3, noise=0.0)
    assert [(j.name, j.finished) for j in again.jobs] == [(j.name, j.finished) for j in runs["cpsat"].jobs]


def test_simulator_rejects_a_double_booking_policy():
    from alto.sched.inter import ExclusivePolicy
    from alto.sched.sim import SimulationError, Simulator

    class Greedy(ExclusivePolicy):  # places every task on GPU 0
        def allocate(self, now, jobs, gpus):
            return {j.name: {0: j.active} for j in jobs}

    tasks = _tasks([(0, "a", "qwen2-0.5b", 1, 1_000_000, 1), (1, "b", "qwen2-0.5b", 1, 1_000_000, 1)])
    with pytest.raises(SimulationError, match="double-booked"):
        Simulator(tasks, Greedy("greedy", None, False, False), gpus=2).run()


# --- trace loaders and the CLI ---------------------------------------------------------------------

def test_trace_loaders_alto_philly_pai(tmp_path):
    from alto.sched import trace

    (tmp_path / "t.csv").write_text("arrival_s,task,base_model,configs,tokens,gpus\n5,b,qwen2-7b,4,1000,2\n"
                                    "0,a,llama-3-8b,8,2000,1\n")
    assert [t.task for t in trace.load(tmp_path / "t.csv")] == ["a", "b"]
    philly = [{"status": "Pass", "vc": "vc1", "jobid": "app_1", "user": "u1", "submitted_time": "2017-10-03 02:00:00",
               "attempts": [{"start_time": "2017-10-03 02:10:00", "end_time": "2017-10-03 03:10:00",
                             "detail": [{"ip": "m1", "gpus": ["gpu0", "gpu1"]}]}]},
              {"status": "Killed", "vc": "vc1", "jobid": "app_2", "user": "u1", "submitted_time": "2017-10-03 02:05:00",
               "attempts": []}]
    (tmp_path / "cluster_job_log.json").write_text(__import__("json").dumps(philly))
    (task,) = trace.load(tmp_path / "cluster_job_log.json", "philly")
    assert (task.task, task.gpus, task.arrival_s) == ("app_1", 2, 0.0)
    from alto.sched.catalog import base_shape
    from alto.sched.inter import Workload

    alone = Workload().duration(base_shape(task.base_model), task.configs, task.tokens, task.gpus)
    assert alone == pytest.approx(3600, rel=0.02)  # the recorded hour of run time is kept
    (tmp_path / "philly.csv").write_text("jobid,submitted_time,num_gpus,duration\nj1,100,4,600\nj2,40,1,60\n")
    assert [(t.task, t.arrival_s, t.gpus) for t in trace.load(tmp_path / "philly.csv", "philly")] == \
        [("j2", 0.0, 1), ("j1", 60.0, 4)]
    (tmp_path / "pai_job_table.csv").write_text("j1,i1,u1,Terminated,1000,4600\nj2,i2,u2,Failed,1100,1200\n"
                                                "j3,i3,u2,Terminated,1200,1800\n")
    (tmp_path / "pai_task_table.csv").write_text("j1,worker,2,Terminated,1000,4600,600,29,100,V100\n"
                                                 "j2,worker,1,Failed,1100,1200,600,29,100,V100\n"
                                                 "j3,tensorflow,1,Terminated,1200,1800,600,29,50,T4\n")
    pai = trace.load(tmp_path / "pai_job_table.csv", "pai")
    assert [(t.task, t.arrival_s, t.gpus) for t in pai] == [("j1", 0.0, 2), ("j3", 200.0, 1)]


@pytest.mark.parametrize("content,match", [
    ("arrival_s,task,base_model,configs,tokens\n0,a,llama-3-8b,1,1\n", "missing column"),
    ("arrival_s,task,base_model,configs,tokens,gpus\n-1,a,llama-3-8b,1,1,1\n", "arrival_s"),
    ("arrival_s,task,base_model,configs,tokens,gpus\n0,a,gpt-5,1,1,1\n", "base_model"),
    ("arrival_s,task,base_model,configs,tokens,gpus\n0,a,llama-3-8b,1,1,99\n", "more than the cluster"),
])
def test_cli_simulate_bad_input_exits_2(tmp_path, capsys, content, match):
    from alto.cli import main

    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert main(["simulate", str(path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1
    assert main(["simulate", str(tmp_path / "missing.csv")]) == 2


def test_cli_simulate_sample_writes_table_and_png(tmp_path, capsys):
    from alto.cli import main

    assert main(["simulate", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(p in out for p in ("alto |", "cpsat |", "fifo |", "sjf |", "tiresias |"))
    assert (tmp_path / "simulate.png").stat().st_size > 10_000
    assert all((tmp_path / f"timeline-{p}.png").stat().st_size > 10_000 for p in ("alto", "cpsat", "fifo", "sjf", "tiresias"))


def test_base_bytes_knows_nf4_and_sharding():
    from alto.sched.catalog import base_shape
    from alto.sched.memory import NF4_BYTES_PER_WEIGHT, base_bytes

    shape = base_shape("llama-3-8b")
    whole = base_bytes(shape)
    assert whole == shape.params() * 2
    projections = shape.matmul_params() - shape.vocab * shape.hidden
    assert base_bytes(shape, quantize="nf4") == pytest.approx(whole - projections * (2 - NF4_BYTES_PER_WEIGHT), abs=2)
    assert base_bytes(shape, shards=1) == whole
    # 2 GPUs: half the decoder layers each, plus two layers gathered at a time; embeddings and head whole
    layer = projections * 2 / shape.layers + 2 * shape.hidden * 2
    embeddings_and_head = whole - shape.layers * layer
    assert base_bytes(shape, shards=2) == pytest.approx(embeddings_and_head + shape.layers * layer / 2 + 2 * layer, abs=2)
    assert base_bytes(shape, shards=4) < base_bytes(shape, shards=2) < whole
    with pytest.raises(ValueError, match="quantize='int3'"):
        base_bytes(shape, quantize="int3")


def test_the_shipped_itp_sample_is_real_jobs_as_tasks():
    """The first 100 jobs of Microsoft's ITP cluster01, read with their own columns: arrivals from 0 in
    submission order, GPUs as recorded, every task predicted to run about its recorded duration alone."""
    import csv as csv_mod
    from importlib import resources

    from alto.sched import trace
    from alto.sched.catalog import base_shape
    from alto.sched.inter import Workload

    with resources.as_file(trace.sample_path("itp")) as path:
        rows = list(csv_mod.DictReader(open(path)))
        tasks = trace.load(path, "itp")
    assert len(tasks) == len(rows) == 100
    assert tasks[0].arrival_s == 0 and all(a.arrival_s <= b.arrival_s for a, b in zip(tasks, tasks[1:]))
    assert [t.gpus for t in tasks] == [int(r["num_gpu"]) for r in rows]
    w = Workload()
    for t, r in list(zip(tasks, rows))[:10]:
        predicted = w.duration(base_shape(t.base_model), t.configs, t.tokens, t.gpus)
        assert predicted == pytest.approx(float(r["duration"]), rel=0.05)


def test_the_time_left_is_the_model_s_steps_scaled_by_the_measured_ones_plus_the_evaluations_left():
    from alto.registry import Registry, Status
    from alto.runlog import Forecast, multiples

    shape = ModelShape(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vocab=300)
    reg = Registry()
    a, b, c = (reg.add(n, AdapterConfig(rank=r, max_steps=s), "t") for n, r, s in (("a", 4, 10), ("b", 8, 6), ("c", 8, 4)))
    a.status = b.status = Status.RUNNING  # c waits for a slot
    f = Forecast(shape, {"t": 32.4}, {"t": 5})
    assert f.left(reg, 0) == (10, None)  # steps are known before any is measured; seconds are not
    f.observe_step([a, b], 2.0 * f.predict([f.work(a), f.work(b)]))  # the device: twice the model's time
    a.micro_step = b.micro_step = 1
    wa, wb, wc = f.work(a), f.work(b), f.work(c)
    assert wa.seq_len == 32 and (wa.micro_steps, wb.micro_steps, wc.micro_steps) == (9, 5, 4)
    # a and b step 5 times together, then c takes b's slot beside a for 4
    expected = 2.0 * (5 * f.predict([wa, wb]) + 4 * f.predict([wa, wc]))
    assert f.left(reg, 1) == (9, pytest.approx(expected))
    f.observe_evaluation(3.0)  # evaluation points left in micro-steps 2..10: 5 and 10
    assert f.left(reg, 1) == (9, pytest.approx(expected + 2 * 3.0))
    a.status = b.status = Status.FINISHED  # nothing runs, c is queued: it runs alone, 4 steps
    c_alone = 2.0 * 4 * f.predict([wc])
    assert f.left(reg, 1) == (4, pytest.approx(c_alone + 1 * 3.0))  # micro-step 5 evaluates
    assert multiples([2, 3], 0, 12) == 8 and multiples([4, 2], 3, 8) == 3 and multiples([], 0, 9) == 0
