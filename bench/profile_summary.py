"""Where a process's wall went, from a py-spy speedscope profile (bench_sweep.py --profile): each
thread's call tree by inclusive seconds (py-spy --idle: waiting counts), the Python import
machinery's frames folded away, branches under --min of the thread's wall left out.
Run: python bench/profile_summary.py RUN.speedscope.json [--min 0.01] [--depth 18]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def frame_label(frame: dict) -> str | None:
    """A frame's short name (file stem:function), or None for the import machinery's own frames."""
    file = frame.get("file") or ""
    if file.startswith(("<frozen importlib", "<frozen runpy")):
        return None
    stem = Path(file).with_suffix("").as_posix().split("site-packages/")[-1].split("/python/")[-1]
    return f"{stem}:{frame['name']}"


def tree(profile: dict, frames: list[dict]) -> dict:
    root: dict = {"s": 0.0, "kids": defaultdict(lambda: None)}
    labels = [frame_label(f) for f in frames]
    for stack, weight in zip(profile["samples"], profile["weights"]):
        node = root
        node["s"] += weight
        for i in stack:
            if labels[i] is None:
                continue
            kids = node["kids"]
            if kids[labels[i]] is None:
                kids[labels[i]] = {"s": 0.0, "kids": defaultdict(lambda: None)}
            node = kids[labels[i]]
            node["s"] += weight
    return root


def show(node: dict, total: float, floor: float, depth: int, indent: int = 0) -> None:
    for label, kid in sorted(((k, v) for k, v in node["kids"].items() if v), key=lambda kv: -kv[1]["s"]):
        if kid["s"] < floor * total or indent >= depth:
            continue
        print(f"{kid['s']:8.2f} s  {'  ' * indent}{label}")
        show(kid, total, floor, depth, indent + 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile")
    ap.add_argument("--min", type=float, default=0.01, help="smallest branch shown, as a share of the thread's wall")
    ap.add_argument("--depth", type=int, default=18)
    args = ap.parse_args()
    doc = json.loads(Path(args.profile).read_text())
    frames = doc["shared"]["frames"]
    for profile in doc["profiles"]:
        unit = {"seconds": 1.0, "milliseconds": 1e-3, "microseconds": 1e-6}[profile.get("unit", "seconds")]
        profile["weights"] = [w * unit for w in profile["weights"]]
        root = tree(profile, frames)
        if root["s"] < 0.5:
            continue
        print(f"\n== {profile['name']}: {root['s']:.1f} s sampled")
        show(root, root["s"], args.min, args.depth)


if __name__ == "__main__":
    main()
