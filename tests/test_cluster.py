"""alto cluster on a local Ray, CPU processes standing in for GPUs (a custom resource `slot`): tasks
placed by the policies alto simulate evaluates, as the simulator places them on the same arrivals;
a task shrinking after early termination, its freed slot taken by a queued task; a task whose
process is killed resuming from its checkpoint to the adapters an uninterrupted run trains; a task
under Ray computing what alto tune computes in-process, bit for bit; a driver that cannot serve
failing its submission. The driver's lifecycle without Ray: tests/test_driver.py."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_LLAMA, write_word_records

pytest.importorskip("ray")

from alto import task_queue  # noqa: E402
from alto.cli import main  # noqa: E402
from alto.cluster import Driver  # noqa: E402
from alto.sched.inter import POLICIES, AltoPolicy, Job  # noqa: E402
from alto.sched.sim import Simulator  # noqa: E402
from alto.tune import tune  # noqa: E402
from test_parallel import assert_same_adapters  # noqa: E402


def write_sweep(folder: Path, name: str, adapters: list[dict], **extra) -> str:
    data = write_word_records(folder / "data.jsonl", max_words=6)
    doc = {"name": name, "model": {"random_llama": TINY_LLAMA}, "base": {"dtype": "float64"}, "device": "cpu",
           "checkpoint_every": 2, "max_running": 4,
           "data": {"source": "jsonl", "path": str(data), "max_length": 24, "eval_fraction": 0.2},
           "defaults": {"target_modules": ["q_proj", "v_proj"], "lr": 3e-3, "micro_batch_size": 2},
           "adapters": adapters, **extra}
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(doc))
    return str(path)


def events(queue: Path) -> list[dict]:
    with open(queue / "events.csv") as f:
        return list(csv.DictReader(f))


def tune_alone(tmp_path: Path, sweep: str, name: str) -> Path:
    """The sweep of task `name` trained by alto tune in this process, on the CPU threads the task's
    ranks recorded (the driver shares its count among a node's slots: the reference computes alike)."""
    alone = tmp_path / "alone.yaml"
    alone.write_text(Path(sweep).read_text().replace(f'"name": "{name}"', f'"name": "{name}", "output": "{tmp_path / "alone"}"'))
    recorded = json.loads((tmp_path / "q" / "tasks" / name / "run" / "threads.json").read_text())["cpu_threads"]
    threads = torch.get_num_threads()
    torch.set_num_threads(recorded)
    try:
        assert tune(str(alone), None, log=lambda *_: None) == 0
    finally:
        torch.set_num_threads(threads)
    return tmp_path / "alone"


def serve(queue: Path, policy: str, slots: int) -> Driver:
    driver = Driver(queue, policy, resource="slot", slots=slots, poll_s=0.2)
    assert driver.run() == 0
    return driver


@pytest.mark.parametrize("policy", ["alto", "cpsat"])
def test_three_tasks_placed_as_the_simulator_places_them(tmp_path, policy):
    queue = tmp_path / "q"
    for name, steps, rank in (("long", 6, 4), ("short", 2, 4), ("mid", 4, 8)):
        task_queue.submit(queue, write_sweep(tmp_path, name, [{"id": "a", "rank": rank, "max_steps": steps}]), 1)
    driver = serve(queue, policy, slots=2)
    status = json.loads((queue / "status.json").read_text())
    assert [t["state"] for t in status["tasks"]] == ["done"] * 3
    for name in ("long", "short", "mid"):
        assert (queue / "tasks" / name / "run" / "adapters" / "a" / "adapter_model.safetensors").is_file()
    # The simulator, on the same arrivals and predictions, with the same policy, places the same
    # tasks on as many GPUs at each of its decisions (the driver's "place" events; its "start"
    # comes when Ray has the GPUs, in whatever order the processes come up).
    rounds: dict[str, set] = {}
    for e in events(queue):
        if e["event"] == "place":
            rounds.setdefault(e["time_s"], set()).add((e["task"], len(e["gpus"].split())))
    jobs = [Job.new(t.job.spec, t.job.shape, t.job.workload) for t in driver.tasks.values()]
    sim_policy = AltoPolicy(share=False) if policy == "alto" else POLICIES[policy]()
    result = Simulator(jobs, sim_policy, 2, restart_s=0.0, migrate_s=0.0, noise=0.0).run()
    sim_rounds: dict[float, set] = {}
    for gpu, task, start, _ in result.holds:
        sim_rounds.setdefault(start, set()).add(task)
    placed = [{task for task, _ in r} for r in rounds.values()]
    assert placed == [sim_rounds[t] for t in sorted(sim_rounds)]
    assert all(n == 1 for r in rounds.values() for _, n in r)  # each asked for one
    started = [e["task"] for e in events(queue) if e["event"] == "place"]
    if policy == "alto":  # shortest predicted first: the longest task waits for a free slot
        assert started[-1] == "long"
    timeline = (queue / "timeline.png").read_bytes()
    assert timeline.startswith(b"\x89PNG")


def test_a_task_shrinks_after_early_exit_and_its_gpu_goes_to_a_queued_task(tmp_path):
    queue = tmp_path / "q"
    # Two configs on two slots (predicted shorter than the other task: they start first); ASHA stops
    # the worse at its first rung: one adapter left, so the policy keeps one slot for it (it resumes
    # there from its checkpoint) and the queued task takes the other while it still trains.
    monitor = {"rule": "asha", "grace": 2, "eta": 2}
    wide = write_sweep(tmp_path, "wide", [{"id": "good", "rank": 8, "lr": 1e-2, "max_steps": 300},
                                          {"id": "bad", "rank": 1, "lr": 1e-6, "max_steps": 300, "seed": 1}],
                       monitor=monitor)
    task_queue.submit(queue, wide, 2)
    task_queue.submit(queue, write_sweep(tmp_path, "next", [{"id": "a", "rank": 4, "max_steps": 600}]), 1)
    serve(queue, "alto", slots=2)
    log = [(e["task"], e["event"], e["gpus"]) for e in events(queue)]
    at = {entry: i for i, entry in reversed(list(enumerate(log)))}  # first index of each entry
    wide_start = [e for e in log if e[0] == "wide" and e[1] == "start"]
    assert wide_start and len(wide_start[0][2].split()) == 2, log
    resumed = [e for e in log if e[0] == "wide" and e[1] == "resume"]
    assert resumed and len(resumed[0][2].split()) == 1, log
    next_start = next(e for e in log if e[0] == "next" and e[1] == "start")
    assert at[("wide", "halt", resumed[0][2])] < at[next_start] < at[("wide", "done", "")], log
    with open(queue / "tasks" / "wide" / "run" / "decisions.csv") as f:
        assert [r["adapter"] for r in csv.DictReader(f)] == ["bad"]
    # The same sweep trained alone, on one process: the same adapters.
    tune_alone(tmp_path, wide, "wide")
    assert_same_adapters(queue / "tasks" / "wide" / "run", tmp_path / "alone", ids=("good", "bad"))


def test_a_killed_task_resumes_from_its_checkpoint_to_the_same_adapters(tmp_path):
    queue = tmp_path / "q"
    sweep = write_sweep(tmp_path, "victim", [{"id": "a", "rank": 4, "max_steps": 1000},
                                             {"id": "b", "rank": 2, "max_steps": 1000, "seed": 1}],
                        checkpoint_every=10)
    driver = subprocess.Popen([sys.executable, "-m", "alto.cli", "cluster", sweep, "--queue", str(queue),
                               "--resource", "slot", "--cluster-gpus", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, killed = time.time() + 240, None
        while killed is None and time.time() < deadline:
            time.sleep(0.2)
            status = json.loads((queue / "status.json").read_text()) if (queue / "status.json").exists() else None
            task = status["tasks"][0] if status and status["tasks"] else None
            if task and task["pids"] and task["micro_steps"] >= 25:
                os.kill(task["pids"][0], signal.SIGKILL)
                killed = task["micro_steps"]
        assert killed is not None and killed < 1000, "the task never ran long enough to be killed"
        assert driver.wait(timeout=240) == 0
    finally:
        driver.kill()
    status = json.loads((queue / "status.json").read_text())["tasks"][0]
    assert (status["state"], status["restarts"]) == ("done", 1)
    # from a checkpoint (written every 10 micro-steps; the kill came after status.json's 25th), not from scratch
    assert 20 <= status["resumed_from"] < 1000 and status["resumed_from"] % 10 == 0
    assert [e["event"] for e in events(queue)] == ["arrive", "place", "start", "died", "place", "resume", "done"]
    tune_alone(tmp_path, sweep, "victim")
    assert_same_adapters(queue / "tasks" / "victim" / "run", tmp_path / "alone", ids="ab")


def test_a_task_under_ray_computes_what_alto_tune_computes_in_this_process(tmp_path):
    # CPU float results depend on torch's thread count (MKL's GEMMs sum in another order on 2 threads
    # than on 1) and Ray starts its workers with OMP_NUM_THREADS=1: the driver gives every rank its
    # count. 2 threads here, whatever OMP_NUM_THREADS this session has.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        queue = tmp_path / "q"
        sweep = write_sweep(tmp_path, "same", [{"id": "a", "rank": 4, "max_steps": 6},
                                               {"id": "b", "rank": 2, "max_steps": 6, "seed": 1}])
        task_queue.submit(queue, sweep, 1)
        serve(queue, "alto", slots=1)
        alone = tmp_path / "alone.yaml"
        alone.write_text(Path(sweep).read_text().replace('"name": "same"', f'"name": "same", "output": "{tmp_path / "alone"}"'))
        assert tune(str(alone), None, log=lambda *_: None) == 0
    finally:
        torch.set_num_threads(threads)
    runs = [queue / "tasks" / "same" / "run", tmp_path / "alone"]
    assert [json.loads((r / "threads.json").read_text()) for r in runs] == [{"cpu_threads": 2}] * 2
    # Each adapter's losses at full precision (alto_adapter.json) and its exported weights, bit for bit
    from safetensors.torch import load_file

    for aid in "ab":
        ray_run, here = (json.loads((r / "adapters" / aid / "alto_adapter.json").read_text()) for r in runs)
        assert ray_run["micro_step"] == here["micro_step"] == 6 and ray_run["losses"] == here["losses"]
        ours, theirs = (load_file(str(r / "adapters" / aid / "adapter_model.safetensors")) for r in runs)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), aid


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("command", ["submit", "cluster"])
def test_a_driver_that_cannot_serve_fails_its_submission(tmp_path, capsys, command):
    queue = tmp_path / "q"
    sweep = write_sweep(tmp_path, "s", [{"id": "a", "rank": 2, "max_steps": 2}])
    assert main([command, sweep, "--queue", str(queue)]) == 2  # no --resource slot: Ray has no GPU here
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"alto {command}: error: "), err
    assert "the Ray cluster has no 'GPU' resource" in err and "--resource slot" in err, err
    assert not (queue / "tasks" / "s").exists()  # the submission went with its driver
    if command == "submit":  # alto status says why no driver serves the queue: the driver's own line
        assert main(["status", "--queue", str(queue)]) == 2
        assert "the Ray cluster has no 'GPU' resource" in capsys.readouterr().err
