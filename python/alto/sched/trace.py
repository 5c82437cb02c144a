"""Job traces: ALTO's CSV format, loaders for the public Microsoft Philly and Alibaba PAI traces,
and the generator of the shipped sample.

ALTO format (header required): ``arrival_s,task,base_model,configs,tokens,gpus`` — arrival in
seconds, a unique task name, a base model of :data:`~alto.sched.catalog.BASE_MODELS`, the number of
LoRA configs, the training tokens per config, the GPUs asked.

Public traces record generic DNN jobs, not tuning tasks, so they are mapped with these assumptions:
- arrival = submission time (Philly ``submitted_time``; PAI ``start_time`` of the job, which is
  its submission in that trace), shifted so the first job arrives at 0;
- GPUs asked = Philly: GPUs of the last attempt (``num_gpus`` in CSV derivatives); PAI: the task
  table's ``plan_gpu`` (percent of one GPU, 100 = 1) × ``inst_num``, rounded up, summed per job;
- duration = the job's recorded run time (last attempt's end - first attempt's start / end - start),
  turned into tokens per config so the task alone on its GPUs is predicted to take that long;
- base model: picked from BASE_MODELS by a stable hash of the user (Philly also ``vc``), so one
  user's jobs share a base model; configs per task: ``configs`` (default 8);
- only jobs that ran to completion with a GPU (Philly status Pass; PAI Terminated) are kept.
"""
from __future__ import annotations

import csv
import io
import json
import math
import zlib
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Iterable

import numpy as np

from alto.inputs import read_text
from alto.sched.catalog import BASE_MODELS, base_shape
from alto.sched.inter import TraceTask, Workload

ALTO_COLUMNS = ("arrival_s", "task", "base_model", "configs", "tokens", "gpus")
# The PAI 2020 release ships its tables without a header row; these are its documented columns.
PAI_JOB_COLUMNS = ("job_name", "inst_id", "user", "status", "start_time", "end_time")
PAI_TASK_COLUMNS = ("job_name", "task_name", "inst_num", "status", "start_time", "end_time",
                    "plan_cpu", "plan_mem", "plan_gpu", "gpu_type")


class TraceError(ValueError):
    """A trace file that cannot be read (names the file, row and field)."""


def _number(value: str, where: str, name: str, kind: type = float):
    try:
        x = kind(value)
        finite = math.isfinite(x)
    except (TypeError, ValueError):
        raise TraceError(f"{where}: {name}={value!r} is not a{'n int' if kind is int else ' number'}") from None
    except OverflowError:  # an int of hundreds of digits
        finite = False
    if not finite or x < 0:
        raise TraceError(f"{where}: {name}={value!r} must be a non-negative finite number")
    return x


def _check(tasks: list[TraceTask], source: str) -> list[TraceTask]:
    if not tasks:
        raise TraceError(f"{source}: no tasks")
    names = [t.task for t in tasks]
    if len(set(names)) != len(names):
        raise TraceError(f"{source}: task names repeat (e.g. {next(n for n in names if names.count(n) > 1)!r})")
    return sorted(tasks, key=lambda t: (t.arrival_s, t.task))


def _csv_rows(path: Path, reader) -> list:
    """The reader's rows; a malformed row names the file and line."""
    rows = []
    try:
        for row in reader:
            if isinstance(row, dict) and (None in row or None in row.values()):
                raise TraceError(f"{path}:{reader.line_num}: {len(reader.fieldnames)} fields expected (the header's)")
            rows.append(row)
    except csv.Error as e:
        raise TraceError(f"{path}:{reader.line_num + 1}: not valid CSV ({e})") from None  # the line being read
    return rows


def _read_csv(path: Path, required: Iterable[str]) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(read_text(path, "trace file"), newline=""))
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise TraceError(f"{path}: missing column(s) {', '.join(missing)} (has: {reader.fieldnames})")
    return _csv_rows(path, reader)


def load_alto(path: str | Path) -> list[TraceTask]:
    path = Path(path)
    tasks = []
    for i, row in enumerate(_read_csv(path, ALTO_COLUMNS), start=2):
        where = f"{path}:{i}"
        if row["base_model"] not in BASE_MODELS:
            raise TraceError(f"{where}: base_model={row['base_model']!r} is unknown; known: {', '.join(BASE_MODELS)}")
        t = TraceTask(_number(row["arrival_s"], where, "arrival_s"), row["task"], row["base_model"],
                      _number(row["configs"], where, "configs", int), _number(row["tokens"], where, "tokens", int),
                      _number(row["gpus"], where, "gpus", int))
        for name in ("configs", "tokens", "gpus"):
            if getattr(t, name) < 1:
                raise TraceError(f"{where}: {name}={getattr(t, name)} must be >= 1")
        if not t.task:
            raise TraceError(f"{where}: task is empty")
        tasks.append(t)
    return _check(tasks, str(path))


def _pick_base(key: str) -> str:
    names = list(BASE_MODELS)
    return names[zlib.crc32(key.encode()) % len(names)]


def _to_task(name: str, arrival: float, duration: float, gpus: int, owner: str, configs: int,
             workload: Workload) -> TraceTask:
    """A recorded job as a tuning task predicted to run `duration` seconds alone on its GPUs."""
    base = _pick_base(owner)
    shape, step_tokens = base_shape(base), workload.config.micro_batch_size * workload.seq_len
    per_token = workload.duration(shape, configs, 10**6, gpus) / 10**6  # duration is ~linear in tokens
    if not math.isfinite(duration / per_token):
        raise TraceError(f"job {name!r}: a run time of {duration} s is out of range")
    tokens = max(step_tokens, round(duration / per_token))
    return TraceTask(arrival, name, base, configs, tokens, gpus)


def _shift(tasks: list[TraceTask]) -> list[TraceTask]:
    t0 = min(t.arrival_s for t in tasks) if tasks else 0.0
    return [TraceTask(t.arrival_s - t0, t.task, t.base_model, t.configs, t.tokens, t.gpus) for t in tasks]


def _philly_time(value: str, where: str) -> float:
    try:
        return datetime.strptime(value, "%Y-%m-%d %H:%M:%S").timestamp()
    except (TypeError, ValueError):
        return _number(value, where, "time")  # the CSV derivatives use seconds


def load_philly(path: str | Path, configs: int = 8, workload: Workload | None = None) -> list[TraceTask]:
    """Philly's ``cluster_job_log`` (JSON list of jobs with ``attempts``) or a CSV derivative with
    ``jobid, submitted_time, num_gpus`` and ``duration`` (or ``start_time, end_time``)."""
    path, workload = Path(path), workload or Workload()
    tasks = []
    if path.suffix == ".json":
        try:
            jobs = json.loads(read_text(path, "trace file"))
        except json.JSONDecodeError as e:
            raise TraceError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(jobs, list):
            raise TraceError(f"{path}: a Philly job log is a JSON list of jobs, not a {type(jobs).__name__}")
        for i, job in enumerate(jobs):
            where = f"{path}: job {i}" + (f" ({job.get('jobid')!r})" if isinstance(job, dict) else "")
            try:
                task = _philly_job(job, where, configs, workload)
            except (AttributeError, TypeError, KeyError, IndexError) as e:
                raise TraceError(f"{where}: not a Philly job record (cluster_job_log's shape): "
                                 f"{type(e).__name__} {e}") from None
            if task is not None:
                tasks.append(task)
    else:
        rows = _read_csv(path, ("jobid", "submitted_time", "num_gpus"))
        for i, row in enumerate(rows, start=2):
            where = f"{path}:{i}"
            if "duration" in row:
                run = _number(row["duration"], where, "duration")
            elif "start_time" in row and "end_time" in row:
                run = _philly_time(row["end_time"], where) - _philly_time(row["start_time"], where)
            else:
                raise TraceError(f"{path}: needs a duration column or start_time and end_time")
            gpus = _number(row["num_gpus"], where, "num_gpus", int)
            if gpus >= 1 and row.get("status", "Pass") == "Pass":
                tasks.append(_to_task(row["jobid"], _philly_time(row["submitted_time"], where), max(run, 1.0),
                                      gpus, row.get("user", row["jobid"]), configs, workload))
    return _check(_shift(tasks), str(path))


def _philly_job(job: dict, where: str, configs: int, workload: Workload) -> TraceTask | None:
    """One job of cluster_job_log as a task (None: it did not pass or had no GPU)."""
    attempts = job.get("attempts") or []
    if job.get("status") != "Pass" or not attempts or not attempts[-1].get("end_time"):
        return None
    gpus = sum(len(d.get("gpus", [])) for d in attempts[-1].get("detail", []))
    if gpus < 1:
        return None
    if "submitted_time" not in job:
        raise TraceError(f"{where}: no submitted_time")
    submitted = _philly_time(job["submitted_time"], where)
    run = _philly_time(attempts[-1]["end_time"], where) - _philly_time(attempts[0]["start_time"], where)
    return _to_task(str(job["jobid"]), submitted, max(run, 1.0), gpus,
                    f"{job.get('vc', '')}/{job.get('user', '')}", configs, workload)


def _pai_rows(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    rows = _csv_rows(path, csv.reader(io.StringIO(read_text(path, "trace file"), newline="")))
    if rows and rows[0][:2] == list(columns[:2]):  # a header row is allowed
        rows = rows[1:]
    bad = next((i for i, r in enumerate(rows, 1) if len(r) != len(columns)), None)
    if bad:
        raise TraceError(f"{path}:{bad}: expected {len(columns)} columns ({', '.join(columns)}), got {len(rows[bad - 1])}")
    return [dict(zip(columns, r)) for r in rows]


def load_pai(job_table: str | Path, task_table: str | Path | None = None, configs: int = 8,
             workload: Workload | None = None) -> list[TraceTask]:
    """Alibaba PAI 2020: ``pai_job_table.csv`` and ``pai_task_table.csv`` (default: next to it)."""
    job_table, workload = Path(job_table), workload or Workload()
    task_table = Path(task_table) if task_table else job_table.with_name("pai_task_table.csv")
    gpus: dict[str, int] = {}
    for i, row in enumerate(_pai_rows(task_table, PAI_TASK_COLUMNS), 1):
        if row["plan_gpu"]:
            need = _number(row["plan_gpu"], f"{task_table}:{i}", "plan_gpu") / 100.0
            inst = _number(row["inst_num"] or "1", f"{task_table}:{i}", "inst_num")
            gpus[row["job_name"]] = gpus.get(row["job_name"], 0) + math.ceil(need * inst)
    tasks = []
    for i, row in enumerate(_pai_rows(job_table, PAI_JOB_COLUMNS), 1):
        where = f"{job_table}:{i}"
        if row["status"] != "Terminated" or gpus.get(row["job_name"], 0) < 1 or not row["end_time"]:
            continue
        start, end = _number(row["start_time"], where, "start_time"), _number(row["end_time"], where, "end_time")
        tasks.append(_to_task(row["job_name"], start, max(end - start, 1.0), gpus[row["job_name"]], row["user"],
                              configs, workload))
    return _check(_shift(tasks), str(job_table))


ITP_COLUMNS = ("job_id", "submission_time", "duration", "num_gpu")


def load_itp(path: str | Path, configs: int = 8, workload: Workload | None = None) -> list[TraceTask]:
    """Microsoft's ITP traces (github.com/microsoft/elasticflow-traces, raw-traces: real production
    DL training jobs of 2021, MIT licence): ``job_id, submission_time`` (seconds), ``duration``
    (seconds), ``num_gpu``. No user column: the base model is picked by the job's id."""
    path, workload = Path(path), workload or Workload()
    tasks = []
    for i, row in enumerate(_read_csv(path, ITP_COLUMNS), start=2):
        where = f"{path}:{i}"
        gpus = _number(row["num_gpu"], where, "num_gpu", int)
        if gpus >= 1:
            tasks.append(_to_task(row["job_id"], _number(row["submission_time"], where, "submission_time"),
                                  max(_number(row["duration"], where, "duration"), 1.0), gpus, row["job_id"],
                                  configs, workload))
    return _check(_shift(tasks), str(path))


LOADERS = {"alto": load_alto, "philly": load_philly, "pai": load_pai, "itp": load_itp}


def load(path: str | Path, fmt: str = "alto") -> list[TraceTask]:
    if fmt not in LOADERS:
        raise TraceError(f"format={fmt!r} is unknown; known: {', '.join(LOADERS)}")
    return LOADERS[fmt](path)


SAMPLES = {"alto": "sample.csv", "itp": "itp_cluster01_head100.csv"}


def sample_path(name: str = "alto"):
    """A shipped trace (package data, so it is in the installed wheel too): our synthetic sample, or
    the first 100 jobs of Microsoft's ITP cluster01 (real; traces/LICENSE-microsoft-elasticflow-traces.txt)."""
    return resources.files("alto.sched").joinpath("traces", SAMPLES[name])


def generate(tasks: int = 40, seed: int = 0, mean_gap_s: float = 300.0) -> list[TraceTask]:
    """A reproducible synthetic trace: Poisson arrivals, a mix of base models (8B-class ones most
    often), 2-32 configs per task, heavy-tailed token counts (log-normal), 1-4 GPUs asked."""
    rng = np.random.default_rng(seed)
    models, weights = list(BASE_MODELS), np.array([0.35, 0.15, 0.15, 0.2, 0.15])
    t, out = 0.0, []
    for i in range(tasks):
        t += float(rng.exponential(mean_gap_s))
        out.append(TraceTask(round(t, 1), f"task{i:03d}", str(rng.choice(models, p=weights)),
                             int(rng.choice([2, 4, 8, 16, 32], p=[0.15, 0.25, 0.3, 0.2, 0.1])),
                             int(round(float(rng.lognormal(np.log(4e6), 1.0)), -3)),
                             int(rng.choice([1, 2, 4], p=[0.5, 0.3, 0.2]))))
    return out


def write_alto(tasks: Iterable[TraceTask], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(ALTO_COLUMNS)
        for t in tasks:
            w.writerow([t.arrival_s, t.task, t.base_model, t.configs, t.tokens, t.gpus])


if __name__ == "__main__":  # regenerates the shipped sample: python -m alto.sched.trace
    write_alto(generate(), Path(__file__).with_name("traces") / "sample.csv")
