"""The ``alto`` command. Every subcommand runs inside one boundary (:func:`main`): whatever it
raises ends as one line on stderr (alto.inputs.report: exit code 2 for bad input, 1 for an internal
error), never as a traceback unless --debug asks for it. Only the commands that train or check the ops
import torch and the compiled library: submit, status, cancel and simulate run without them.

(Over 300 lines for a reason: every subcommand's arguments are declared here, in one parser, beside
the one error boundary and the process's exit; split, the boundary would wrap parsers it cannot see.)"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import logging
import os
import sys
import threading
from pathlib import Path

from alto.inputs import report


def cmd_check(args: argparse.Namespace) -> int:
    """Runs base+LoRA forward/backward for a few co-located adapters on this machine's device and
    compares every output and gradient with a float64 per-adapter computation on the CPU."""
    import torch

    import alto_ext
    from alto_ext import Segments, reference

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA GPU on this machine")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    alto_ext.set_sync_checks(True)
    tokens, ranks = [96, 0, 7, 200], [8, 16, 1, 64]
    scaling = [2.0, 1.0, 16.0, 0.5]
    d_in, d_out = 256, 384
    seg = Segments.build(tokens, ranks, scaling, device=device)
    T, R = seg.num_tokens, seg.total_rank
    torch.manual_seed(args.seed)
    x = torch.randn(T, d_in, dtype=torch.float64)
    W = torch.randn(d_out, d_in, dtype=torch.float64) / d_in**0.5
    A = torch.randn(R, d_in, dtype=torch.float64) / d_in**0.5
    B = torch.randn(R, d_out, dtype=torch.float64)
    gy = torch.randn(T, d_out, dtype=torch.float64)

    leaves = [t.to(device, dtype).requires_grad_() for t in (x, A, B)]
    y = alto_ext.multi_lora_linear(leaves[0], W.to(device, dtype), None, leaves[1], leaves[2], seg)
    y.backward(gy.to(device, dtype))

    ref_leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    y_ref = reference.lora_linear(ref_leaves[0], W, None, *ref_leaves[1:], Segments.build(tokens, ranks, scaling))
    y_ref.backward(gy)

    results = [("y", reference.rel_err(y, y_ref))] + [
        (f"d{name}", reference.rel_err(t.grad, r.grad)) for name, t, r in zip("xAB", leaves, ref_leaves)
    ]
    backend = "CUTLASS sm_90a" if device.type == "cuda" and alto_ext.WITH_CUDA else "ATen reference"
    print(f"alto check on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{dtype}, ops built with CUDA: {alto_ext.WITH_CUDA}, kernels: {backend}")
    print(f"adapters: tokens {tokens}, ranks {ranks}, scaling {scaling}; d {d_in}->{d_out}")
    print(f"{'tensor':<8}{'rel. error vs float64':>24}{'limit':>10}")
    ok = True
    for name, err in results:
        good = err < tol
        ok &= good
        print(f"{name:<8}{err:>24.2e}{tol:>10.0e}  {'ok' if good else 'FAIL'}")
    print("all outputs and gradients match" if ok else "MISMATCH: see the rows marked FAIL")
    return 0 if ok else 1


def cmd_tune(args: argparse.Namespace) -> int:
    from alto.tune import tune

    if args.sweep and args.resume:
        raise ValueError(f"give a sweep file or --resume RUN_DIR, not both ({args.sweep!r} and {args.resume!r})")
    from alto.timing import process_start_time

    return tune(args.sweep, args.resume, args.stop_after, nproc=args.nproc, bar=sys.stdout.isatty(),
                started=process_start_time())


def cmd_simulate(args: argparse.Namespace) -> int:
    """Replays a trace under our policy and the baselines; prints one table, writes simulate.png and
    one timeline per policy (which task held which GPU when)."""
    from importlib import resources

    from alto.sched import sim, trace

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out!r} is a file; it must be a folder (made if missing)")
    if args.trace is None:
        with resources.as_file(trace.sample_path(args.sample)) as path:
            tasks = trace.load(path, args.sample)
    else:
        tasks = trace.load(args.trace, args.format)
    results = sim.compare(tasks, args.gpus)
    print(f"{len(tasks)} tasks on {args.gpus} H100 GPUs")
    print(sim.format_table(results))
    out.mkdir(parents=True, exist_ok=True)
    sim.plot(results, out / "simulate.png")
    for r in results:
        sim.plot_holds(r.holds, args.gpus, out / f"timeline-{r.policy}.png", f"{r.policy}: which task held which GPU")
    print(f"wrote {out / 'simulate.png'} and timeline-<policy>.png")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Adds a sweep to the queue; starts the queue's driver (alto cluster, in the background, its
    output in QUEUE/driver.log) if none serves it, and waits until it serves: a driver that cannot
    (no such Ray resource, Ray would not start) takes the submission back, its error line is submit's."""
    import importlib.util

    from alto import task_queue

    if importlib.util.find_spec("ray") is None:  # its driver would fail in the background
        raise ValueError("alto submit needs Ray: pip install 'alto[cluster]'")
    task_queue.check_address(args.address)  # here, not only in the driver's log
    queue = Path(args.queue)
    sweep = task_queue.submit(queue, args.sweep, args.gpus)
    if not task_queue.driver_running(queue):
        flags = ["--queue", str(queue), "--policy", args.policy, "--resource", args.resource,
                 "--linger", str(300 if args.linger is None else args.linger)]
        flags += ["--cluster-gpus", str(args.cluster_gpus)] if args.cluster_gpus else []
        flags += ["--address", args.address] if args.address else []
        ended = task_queue.start_driver(queue, flags)
        if ended is not None and ended[0] is None:  # still starting: the submission stays for it
            print(f"submitted {sweep.name} to {queue}; its driver has not served yet (driver.log ends: {ended[1]}); "
                  f"alto status --queue {queue} shows when it does", file=sys.stderr)
            return 0
        if ended is not None:  # it never served: the submission goes with it
            task_queue.remove(queue, sweep.name)
            code, said = ended
            if code == 2:  # bad input, found by the driver (no such Ray resource, ...)
                raise ValueError(f"its driver could not start: {said.removeprefix('alto cluster: error: ')}")
            print(f"alto submit: error: its driver could not start (exit code {code}): {said}", file=sys.stderr)
            return 1
    print(f"submitted {sweep.name} to {queue}; its driver serves it (alto status --queue {queue}; "
          f"output in {queue / 'driver.log'})")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    """Serves the queue in the foreground: places its tasks on the Ray cluster's GPUs until none is
    left (and none arrived for --linger seconds)."""
    from alto import task_queue

    queue = Path(args.queue)
    from alto.cluster import Driver

    try:  # checks its flags; starts nothing (its Ray backend imports ray: only here)
        driver = Driver(queue, args.policy, args.resource, args.address, args.cluster_gpus, args.gpu_type,
                        linger_s=args.linger or 0)
    except ImportError as e:
        raise ValueError(f"alto cluster needs Ray: pip install 'alto[cluster]' ({e})") from None
    if task_queue.driver_running(queue):
        raise ValueError(f"a driver serves {str(queue)!r} already: add tasks with alto submit")
    checked = [task_queue.check(queue, path, args.gpus) for path in args.sweeps]  # all, before any is written
    names = [sweep.name for _, sweep in checked]
    if len(set(names)) < len(names):
        raise ValueError(f"two of the sweep files are named {next(n for n in names if names.count(n) > 1)!r}")
    for text, sweep in checked:
        task_queue.add(queue, text, sweep, args.gpus)
    try:
        return driver.run()
    except Exception:
        if driver.state == "starting" and not task_queue.driver_running(queue):  # it never served them: they go
            for name in names:
                task_queue.remove(queue, name)
        raise


def cmd_status(args: argparse.Namespace) -> int:
    from alto import task_queue

    print(task_queue.status_text(Path(args.queue)))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from alto import task_queue

    queue = Path(args.queue)
    task_queue.request_cancel(queue, args.task)
    if task_queue.driver_running(queue):
        print(f"cancel of {args.task} requested: the driver halts it at a checkpoint (alto status shows it)")
    else:
        task_queue.update_task(queue, args.task, state="cancelled")
        print(f"{args.task} cancelled (no driver was running it)")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, exit code 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int, below: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"{value} must be < {below}")
        return value
    return parse


class _Version(argparse.Action):
    """--version: alto's release and torch's build (torch imported only here: the queue commands run without it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            import torch
        except ImportError:
            torch = None
        try:
            release = importlib.metadata.version("alto")
        except importlib.metadata.PackageNotFoundError:  # run from a source tree that was not installed
            release = "(not installed)"
        print(f"alto {release} (torch {torch.__version__ if torch else 'not installed'})")
        parser.exit()


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser = _Parser(prog="alto", description="Co-located multi-LoRA training")
    parser.add_argument("--version", action=_Version, nargs=0, default=argparse.SUPPRESS, help="show the versions and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    check = sub.add_parser("check", parents=[common], help="verify the op library on this machine against float64")
    check.add_argument("--device", choices=("cpu", "cuda"), help="cpu or cuda (default: cuda when available)")
    check.add_argument("--seed", type=_int_at_least(0, below=2**63), default=0)  # torch.manual_seed's range
    check.set_defaults(func=cmd_check)
    tune = sub.add_parser("tune", parents=[common], help="train a sweep of LoRA configurations together")
    tune.add_argument("sweep", nargs="?", help="sweep YAML (default: SmolLM2-135M on chatterbot-corpus)")
    tune.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    tune.add_argument("--stop-after", type=_int_at_least(1), metavar="N",
                      help="stop after N micro-steps of this command (counted from where it starts: "
                           "0, or the checkpoint it resumes) at a checkpoint; alto tune --resume continues")
    tune.add_argument("--nproc", type=_int_at_least(1), default=1, metavar="N",
                      help="ranks on this host (one GPU each, or CPU processes): adapters are spread "
                           "over them, each trained whole on one rank (default 1; torchrun works too)")
    tune.set_defaults(func=cmd_tune)
    simulate = sub.add_parser("simulate", parents=[common],
                              help="replay a job trace under ALTO's scheduler and FIFO/SJF/Tiresias")
    simulate.add_argument("trace", nargs="?", help="trace file (default: the shipped sample trace)")
    simulate.add_argument("--gpus", type=_int_at_least(1), default=8, help="GPUs in the cluster (default 8)")
    simulate.add_argument("--out", default=".", help="folder for simulate.png (default: .)")
    simulate.add_argument("--format", choices=("alto", "philly", "pai", "itp"), default="alto",
                          help="alto CSV, Philly job log (JSON or CSV), PAI pai_job_table.csv or Microsoft ITP CSV")
    simulate.add_argument("--sample", choices=("alto", "itp"), default="alto",
                          help="without a trace file: the shipped synthetic sample (alto) or the real ITP one (itp)")
    simulate.set_defaults(func=cmd_simulate)
    from alto.sched.inter import POLICIES
    from alto.task_queue import DEFAULT_QUEUE

    queue = argparse.ArgumentParser(add_help=False)
    queue.add_argument("--queue", default=DEFAULT_QUEUE, metavar="DIR", help=f"the queue folder (default {DEFAULT_QUEUE})")
    driver = argparse.ArgumentParser(add_help=False)
    driver.add_argument("--policy", choices=tuple(POLICIES), default="alto", help="inter-task policy (default alto)")
    driver.add_argument("--address", help="join this Ray cluster (default: start one on this machine)")
    driver.add_argument("--resource", default="GPU", help="the Ray resource a task's ranks take one of "
                        "(default GPU; a custom one, e.g. slot, runs ranks as CPU processes)")
    driver.add_argument("--cluster-gpus", type=_int_at_least(1), metavar="N",
                        help="GPUs (or slots) of the Ray started here (default: the GPUs this machine has)")
    driver.add_argument("--linger", type=_int_at_least(0), metavar="S",
                        help="keep serving S seconds after the queue empties (default: alto cluster 0, "
                             "the driver alto submit starts 300)")
    driver.add_argument("--gpu-type", default="H100", help="GPU type the step-time model predicts for (default H100)")
    submit = sub.add_parser("submit", parents=[common, queue, driver],
                            help="add a sweep to the queue (its driver starts if none runs)")
    submit.add_argument("sweep", help="sweep YAML: one task (one or several tenants: tasks:)")
    submit.add_argument("--gpus", type=_int_at_least(1), default=1, help="GPUs the task asks for (default 1)")
    submit.set_defaults(func=cmd_submit)
    cluster = sub.add_parser("cluster", parents=[common, queue, driver],
                             help="serve the queue: place its tasks on a Ray cluster's GPUs (foreground)")
    cluster.add_argument("sweeps", nargs="*", help="sweep files to submit first")
    cluster.add_argument("--gpus", type=_int_at_least(1), default=1, help="GPUs each of those asks for (default 1)")
    cluster.set_defaults(func=cmd_cluster)
    status = sub.add_parser("status", parents=[common, queue], help="the queue's tasks, GPUs, predicted and actual times")
    status.set_defaults(func=cmd_status)
    cancel = sub.add_parser("cancel", parents=[common, queue], help="halt a task at a checkpoint and end it")
    cancel.add_argument("task", help="the task's name (its sweep's name)")
    cancel.set_defaults(func=cmd_cancel)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (its one line is printed: code 2) or --help (0)
        return int(e.code or 0)
    try:
        return args.func(args)
    except Exception as e:
        if args.debug:
            raise
        return report(args.command, e)


def _observed() -> bool:
    """Whether a profiler or tracer watches this process (sys.setprofile / settrace, or a
    sys.monitoring tool on Python 3.12+)."""
    monitoring = getattr(sys, "monitoring", None)
    tools = monitoring is not None and any(monitoring.get_tool(i) for i in range(6))
    return sys.getprofile() is not None or sys.gettrace() is not None or tools


def entry() -> None:
    """The `alto` console script (and `python -m alto.cli`): main()'s exit code. An `alto tune` that
    ended leaves the process at once (os._exit) once its output is flushed and no thread of its own
    is still working: everything it writes is written before main() returns, and tearing the
    interpreter down (torch's and transformers' modules, the run's tensors, the CUDA context through
    Python) took 2.2 s of a 56.8 s sweep on the H200 (bench/RESULTS.md, 2026-12-04), about 0.5 s of
    it a bare torch process's. Other commands (Ray's drivers, the queue) exit as usual, and so does a
    tune under a profiler or tracer (python -m cProfile, coverage: they write their files at exit)."""
    code = main()
    working = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if sys.argv[1:2] != ["tune"] or working or _observed():
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (| head): nothing more to say
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
