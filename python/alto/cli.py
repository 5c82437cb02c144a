"""The ``alto`` command."""
from __future__ import annotations

import argparse
import sys

import torch


def cmd_check(args: argparse.Namespace) -> int:
    """Runs base+LoRA forward/backward for a few co-located adapters on this machine's device and
    compares every output and gradient with a float64 per-adapter computation on the CPU."""
    import alto_ext
    from alto_ext import Segments, reference

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

    return tune(args.sweep, args.resume, args.stop_after, nproc=args.nproc)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Replays a trace under our policy and the baselines; prints one table, writes a PNG."""
    from importlib import resources
    from pathlib import Path

    from alto.sched import sim, trace

    try:
        if args.trace is None:
            with resources.as_file(trace.sample_path()) as path:
                tasks = trace.load(path, "alto")
        else:
            tasks = trace.load(args.trace, args.format)
        if args.gpus < 1:
            raise ValueError(f"--gpus={args.gpus} must be >= 1")
        results = sim.compare(tasks, args.gpus)
    except ValueError as e:  # TraceError included
        print(f"alto simulate: {e}", file=sys.stderr)
        return 2
    print(f"{len(tasks)} tasks on {args.gpus} H100 GPUs")
    print(sim.format_table(results))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sim.plot(results, out / "simulate.png")
    print(f"wrote {out / 'simulate.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alto", description="Co-located multi-LoRA training")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="verify the op library on this machine against float64")
    check.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(func=cmd_check)
    tune = sub.add_parser("tune", help="train a sweep of LoRA configurations together")
    tune.add_argument("sweep", nargs="?", help="sweep YAML (default: SmolLM2-135M on chatterbot-corpus)")
    tune.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    tune.add_argument("--stop-after", type=int, metavar="N", help="stop after N micro-steps (resumable)")
    tune.add_argument("--nproc", type=int, default=1, metavar="N",
                      help="ranks on this host (one GPU each, or CPU processes): adapters are spread "
                           "over them, each trained whole on one rank (default 1; torchrun works too)")
    tune.set_defaults(func=cmd_tune)
    simulate = sub.add_parser("simulate", help="replay a job trace under ALTO's scheduler and FIFO/SJF/Tiresias")
    simulate.add_argument("trace", nargs="?", help="trace file (default: the shipped sample trace)")
    simulate.add_argument("--gpus", type=int, default=8, help="GPUs in the cluster (default 8)")
    simulate.add_argument("--out", default=".", help="folder for simulate.png (default: .)")
    simulate.add_argument("--format", choices=("alto", "philly", "pai"), default="alto",
                          help="alto CSV, Philly job log (JSON or CSV) or PAI pai_job_table.csv")
    simulate.set_defaults(func=cmd_simulate)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
