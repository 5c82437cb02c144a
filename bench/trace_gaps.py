"""Where does the GPU wait for the host, and what does it run? Reads a Chrome trace written by
torch.profiler with with_stack=True (e.g. `bench_step.py --profile DIR`, gzipped or not) and prints
the GPU's busy time, the host's most frequent CUDA calls (launches, copies), its idle gaps longer than
--min-ms (the --top longest with the innermost Python frames running at each gap's middle), and the
--kernels GPU kernels with the most total time. Python-heavy stretches
run slower under with_stack, so gaps there are upper bounds.
Run: python bench/trace_gaps.py DIR/alto.json DIR/base.json
"""
from __future__ import annotations

import argparse
import gzip
import json


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def report(path: str, min_ms: float, top: int, kernels: int) -> None:
    events = load(path)
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    python = [e for e in events if e.get("cat") == "python_function" and "dur" in e]
    if not gpu:
        raise SystemExit(f"{path}: no GPU events (was the trace taken with ProfilerActivity.CUDA?)")
    busy = sum(e["dur"] for e in gpu)
    span = gpu[-1]["ts"] + gpu[-1]["dur"] - gpu[0]["ts"]
    gaps, end = [], gpu[0]["ts"] + gpu[0]["dur"]
    for e in gpu[1:]:
        if e["ts"] - end > min_ms * 1e3:
            gaps.append((e["ts"] - end, end, e["ts"], e["name"]))
        end = max(end, e["ts"] + e["dur"])
    gaps.sort(reverse=True)
    print(f"{path}: {len(gpu)} GPU events, busy {busy / 1e3:.1f} ms of {span / 1e3:.1f} ms (first to last); "
          f"{len(gaps)} gaps > {min_ms} ms, {sum(g[0] for g in gaps) / 1e3:.1f} ms in all")
    # What the host asked of CUDA (launches, copies, attribute sets): a host-bound step's cost by count.
    calls: dict[str, int] = {}
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver"):
            name = "(unnamed)" if e["name"] == "INVALID" else e["name"]  # calls the profiler has no name for
            calls[name] = calls.get(name, 0) + 1
    if calls:
        ranked_calls = sorted(calls.items(), key=lambda kv: (-kv[1], kv[0]))[:6]
        print("  host calls: " + ", ".join(f"{n} {name}" for name, n in ranked_calls))
    for length, start, stop, next_kernel in gaps[:top]:
        mid = (start + stop) / 2
        frames = sorted((p for p in python if p["ts"] <= mid <= p["ts"] + p["dur"]), key=lambda p: p["dur"])
        print(f"  {length / 1e3:7.2f} ms before {next_kernel[:50]!r}")
        for p in frames[:4]:
            print(f"      in {p['name'][:100]}")
    by_name: dict[str, list[float]] = {}
    for e in gpu:
        by_name.setdefault(e["name"], []).append(e["dur"])
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
    for name, durs in ranked[:kernels]:
        print(f"  {sum(durs) / 1e3:8.2f} ms {len(durs):5d}x  {name[:110]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--min-ms", type=float, default=0.2)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--kernels", type=int, default=0, help="also list the N kernels with the most GPU time")
    args = ap.parse_args()
    for path in args.traces:
        report(path, args.min_ms, args.top, args.kernels)


if __name__ == "__main__":
    main()
