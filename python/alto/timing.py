"""Where a run's wall goes: timing.json, the seconds of the command's whole wall in each of PHASES,
from the process's start (alto tune) or the call (a caller's process)."""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

# Where a run's time goes (timing.json), the whole wall of the command: start-up (the interpreter,
# imports, reading the sweep: from the process's start, or from the call, in a caller's process),
# loading the base, tokenizing, the memory model's calibration, training steps, held-out evaluations
# (and decoding for metrics), checkpoints, writing the results, and the rest (other).
PHASES = ("startup", "load", "tokenize", "calibrate", "train", "evaluate", "checkpoint", "export", "other")


def process_start_time() -> float:
    """When this process began (time.time()'s clock), read from Linux's /proc (its start in clock
    ticks after boot, against the boot clock now: /proc/stat's boot time is whole seconds); elsewhere now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


@contextlib.contextmanager
def timed(seconds: dict[str, float], phase: str):
    """Adds the seconds the block takes to seconds[phase]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start


class Timing:
    """A run's seconds in each of PHASES, from `started` (time.time(): the command's start; what
    passed before this is startup; what no phase holds is other, counted at the end)."""

    def __init__(self, started: float):
        self.started = started
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.seconds["startup"] = time.time() - started

    def phase(self, name: str):
        """A block whose seconds count in phase `name`."""
        return timed(self.seconds, name)

    def write(self, run_dir: Path, log: Callable[[str], None]) -> None:
        """timing.json, and a line that says it."""
        named = sum(v for phase, v in self.seconds.items() if phase != "other")
        self.seconds["other"] = max(0.0, time.time() - self.started - named)
        (run_dir / "timing.json").write_text(json.dumps({k: round(v, 3) for k, v in self.seconds.items()}))
        log("seconds: " + " | ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()))
