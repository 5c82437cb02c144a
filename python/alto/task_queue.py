"""The queue folder of `alto submit` / `alto cluster` / `alto status` / `alto cancel`: what every
command and the driver (alto.cluster) read and write, and how alto submit starts a driver for it
(no Ray, torch or compiled library needed here: alto submit runs where none is built).

    QUEUE/tasks/<name>/task.json    the task: asked GPUs, submission time, state, restarts, error
    QUEUE/tasks/<name>/sweep.yaml   the sweep as submitted
    QUEUE/tasks/<name>/run/         its run folder (alto tune's: checkpoint, losses, leaderboards, adapters)
    QUEUE/cancel/<name>             a cancel request (the driver halts the task at a checkpoint)
    QUEUE/driver.lock, driver.log   held by the one driver serving the queue; its output
    QUEUE/status.json               the driver's view, rewritten every poll and as it ends (alto status prints it)
    QUEUE/events.csv, holds.csv     every start, halt, end, restart; which task held which GPU when
    QUEUE/predictions.csv           each running task's predicted remaining seconds as it ran
    QUEUE/timeline.png              the holds, drawn (alto.sched.sim.plot_holds)

A task folder appears whole (written aside, then renamed) or not at all, so the driver never reads
half a submission. The run folder lives in the queue so that a task resumed on another node finds
its checkpoint: on a cluster of several nodes the queue folder must be on storage they all see.
"""
from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from alto.inputs import read_text
from alto.sweep import Sweep, parse_sweep

DEFAULT_QUEUE = "runs/queue"
ENDED = ("done", "failed", "cancelled")  # states a task never leaves


def write_json(path: Path, value) -> None:
    """Atomically (a reader sees the old or the new file, never half of one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def write_rows(path: Path, header, rows) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def task_dir(queue: Path, name: str) -> Path:
    return queue / "tasks" / name


def check(queue: Path, sweep_path: str, gpus: int) -> tuple[str, Sweep]:
    """A submission's sweep file (its text, parsed) and flags, checked: bad input raises one
    ValueError line, before anything is written."""
    if not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"--gpus={gpus!r} must be an int >= 1")
    if queue.exists() and not queue.is_dir():
        raise ValueError(f"--queue {str(queue)!r} is a file; it must be a folder (made if missing)")
    text = read_text(sweep_path, "sweep file")
    sweep = parse_sweep(text, sweep_path)
    if task_dir(queue, sweep.name).exists():
        raise ValueError(f"{sweep_path}: name: a task named {sweep.name!r} is in {str(queue)!r} already "
                         "(give the sweep another name)")
    return text, sweep


def submit(queue: Path, sweep_path: str, gpus: int) -> Sweep:
    """Adds the sweep (checked first: alto.task_queue.check) to the queue as a task asking for
    `gpus` GPUs; the task's name is the sweep's name."""
    text, sweep = check(queue, sweep_path, gpus)
    add(queue, text, sweep, gpus)
    return sweep


def add(queue: Path, text: str, sweep: Sweep, gpus: int) -> None:
    """A checked sweep (check's text and sweep) into the queue: its folder appears whole or not at all."""
    final = task_dir(queue, sweep.name)
    tmp = queue / "tasks" / f".{sweep.name}.{os.getpid()}.tmp"
    tmp.mkdir(parents=True)
    try:
        (tmp / "sweep.yaml").write_text(text)
        write_json(tmp / "task.json", {"name": sweep.name, "gpus": gpus, "submitted": time.time(),
                                       "state": "queued", "restarts": 0, "error": None})
        os.rename(tmp, final)  # fails if another submission of that name won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove(queue: Path, name: str) -> None:
    """Takes a submission back (its driver never served it)."""
    shutil.rmtree(task_dir(queue, name))


def tasks(queue: Path) -> list[dict]:
    """Every submitted task's record, oldest first."""
    found = [json.loads(p.read_text()) for p in (queue / "tasks").glob("*/task.json")]
    return sorted(found, key=lambda t: (t["submitted"], t["name"]))


def update_task(queue: Path, name: str, **fields) -> dict:
    path = task_dir(queue, name) / "task.json"
    record = {**json.loads(path.read_text()), **fields}
    write_json(path, record)
    return record


def request_cancel(queue: Path, name: str) -> None:
    if not (task_dir(queue, name) / "task.json").is_file():
        known = ", ".join(t["name"] for t in tasks(queue)) if (queue / "tasks").is_dir() else "none"
        raise ValueError(f"no task {name!r} in {str(queue)!r} (tasks: {known or 'none'})")
    state = json.loads((task_dir(queue, name) / "task.json").read_text())["state"]
    if state in ENDED:
        raise ValueError(f"task {name!r} in {str(queue)!r} has ended ({state}): nothing to cancel")
    (queue / "cancel").mkdir(exist_ok=True)
    (queue / "cancel" / name).touch()


def cancel_requested(queue: Path, name: str) -> bool:
    return (queue / "cancel" / name).exists()


class DriverLock:
    """The one driver of a queue holds QUEUE/driver.lock (an flock: released by the kernel when the
    driver's process ends, however it ends)."""

    def __init__(self, queue: Path) -> None:
        queue.mkdir(parents=True, exist_ok=True)
        self.file = open(queue / "driver.lock", "a+")

    def acquire(self) -> bool:
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def release(self) -> None:
        self.file.close()  # closing the file drops the lock


def driver_running(queue: Path) -> bool:
    if not (queue / "driver.lock").exists():
        return False
    lock = DriverLock(queue)
    try:
        return not lock.acquire()
    finally:
        lock.release()


def served_by(queue: Path, pid: int) -> bool:
    """Whether the driver of process pid has served the queue (written status.json after a whole poll)."""
    try:
        return json.loads((queue / "status.json").read_text())["driver"]["pid"] == pid
    except FileNotFoundError:
        return False


def driver_log_end(queue: Path, start: int = 0) -> str | None:
    """The last line of QUEUE/driver.log from byte `start` on (None: none there): a driver that failed
    ends it with its error line."""
    try:
        with open(queue / "driver.log", "rb") as f:
            f.seek(max(start, f.seek(0, os.SEEK_END) - 65536))  # its end is enough; Ray's output can be long
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return None
    return next((line.strip() for line in reversed(lines) if line.strip()), None)


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def status_text(queue: Path) -> str:
    """What `alto status` prints: the driver (one that is gone: how it ended, or, killed without a
    word, driver.log's last line; a later driver that ended before it served: its last line), then
    one row per task."""
    path = queue / "status.json"
    if not path.is_file():
        said = driver_log_end(queue)
        raise ValueError(f"--queue {str(queue)!r}: no driver has served this queue yet "
                         f"{f'(driver.log ends: {said})' if said else '(alto submit starts one)'}")
    status, driver_alive, log_end = json.loads(path.read_text()), driver_running(queue), driver_log_end(queue)
    log = queue / "driver.log"
    d = status["driver"]
    head = (f"queue {status['queue']} | driver {'running' if driver_alive else 'not running'} | policy {d['policy']} | "
            f"{d['slots']} {d['resource']} | {status['now_s']:.0f} s since the driver started")
    if not driver_alive and d.get("state") in ("ended", "failed"):
        head += f"\nthe driver {d['state']}: {d['reason']}"
    elif not driver_alive:  # killed (or its machine lost) while serving: it wrote nothing more
        head += f"\nthe driver ended without a word (killed?); driver.log ends: {log_end or '-'}"
    rows = [("task", "state", "GPUs", "asked", "micro-step", "adapters left", "predicted left s",
             "predicted total s", "actual total s", "restarts")]
    for t in status["tasks"]:
        rows.append((t["name"], t["state"], ",".join(map(str, t["gpus"])) or "-", str(t["asked"]),
                     f"{t['micro_steps']}/{t['planned_micro_steps']}", str(t["active"]),
                     seconds(t["predicted_left_s"]), seconds(t["predicted_total_s"]), seconds(t["actual_total_s"]),
                     str(t["restarts"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"  {t['name']}: {t['error']}" for t in status["tasks"] if t.get("error")]
    if not driver_alive and log.is_file() and log.stat().st_mtime > path.stat().st_mtime:  # (it writes no status.json)
        lines.append(f"a later driver ended before it served: driver.log ends: {log_end}")
    if (queue / "timeline.png").is_file():
        lines.append(f"timeline: {queue / 'timeline.png'}")
    return "\n".join(lines)


def check_address(address: str | None) -> None:
    """An --address nothing answers at is bad input, said in one line at once (ray.init would retry
    for minutes, printing its own warnings). "auto" (the address a `ray start` left) is Ray's to find."""
    if address is None or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--address {address!r} must be HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ValueError(f"--address {address!r}: nothing answers there ({e})") from None


DRIVER_START_S = 180  # how long alto submit waits for its driver to serve (Ray's start takes 5-15 s)


def start_driver(queue: Path, flags: list[str]) -> tuple[int | None, str] | None:
    """Starts a driver (`alto cluster FLAGS`) in the background, its output appended to
    QUEUE/driver.log, and waits until it serves the queue (or another driver does: it lost the
    queue's lock to one): None. A driver that ended first: its exit code and last line of output;
    one still starting after DRIVER_START_S: None for the code (it may serve yet: the submission stays)."""
    log_path = queue / "driver.log"
    start = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "a") as log:
        driver = subprocess.Popen([sys.executable, "-m", "alto.cli", "cluster", *flags], stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + DRIVER_START_S
    while driver.poll() is None and not served_by(queue, driver.pid):
        if time.time() > deadline:
            return None, driver_log_end(queue, start) or "no output"
        time.sleep(0.2)
    if served_by(queue, driver.pid) or driver_running(queue):  # (served, then ended: --linger 0)
        return None
    return driver.returncode, driver_log_end(queue, start) or "no output"
