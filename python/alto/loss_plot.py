"""losses.png: each adapter's training losses, drawn by a process of its own (LossPlot) that imports
matplotlib as the run starts, on another core, and draws once the run hands it the losses at its end.
In the run's own process that import sat on the end of the wall: 0.5 s with bytecode, 1.9 s where
site-packages have none (the H200 image sets PYTHONDONTWRITEBYTECODE=1); in a thread it would take
the GIL from host-bound steps instead.

The process runs this file as a script (alto need not be importable there: a caller may have put it
on sys.path itself), the losses as JSON on its stdin; it exits quietly on an empty stdin (a run that
ended without its end)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the drawing process imports no more than matplotlib
    from alto.registry import Registry


class LossPlot:
    """The drawing process of one run's losses.png (started here, as the run starts)."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}  # one figure: no thread pools
        # -P: this file's folder (alto/, whose sched/ would shadow the standard library's) stays off sys.path
        self._proc = subprocess.Popen([sys.executable, "-P", str(Path(__file__).resolve())], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)

    def draw(self, registry: Registry, path: Path) -> None:
        """Hands over every adapter's losses and waits for `path` (the drawing's error raised, its last line)."""
        curves = [{"id": a.id, "status": a.status.value, "losses": a.losses} for a in registry]
        _, err = self._proc.communicate(json.dumps({"path": str(path), "curves": curves}).encode())
        if self._proc.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines() or [f"exit code {self._proc.returncode}"]
            raise RuntimeError(f"drawing {path.name} failed: {lines[-1]}")

    def close(self) -> None:
        """Ends the process if it still runs (a run that ends without drawing): its stdin closed, it
        leaves once its imports are done. Not killed then: matplotlib's first import in a fresh
        environment builds its font cache under a lock file that a kill would leave behind."""
        if self._proc.poll() is None:
            try:
                self._proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.communicate()


def plot_losses(curves: list[dict], path: str) -> None:
    """curves: {id, status, losses} of each adapter (a cross where the monitor stopped one)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for c in curves:
        losses = c["losses"]
        line, = ax.plot(range(1, len(losses) + 1), losses, label=f"{c['id']} ({c['status']})", linewidth=1.2)
        if c["status"] == "stopped-early" and losses:
            ax.plot(len(losses), losses[-1], "x", color=line.get_color(), markersize=9, markeredgewidth=2)
    ax.set_xlabel("micro-step of the adapter (x: stopped early)")
    ax.set_ylabel("training loss (mean over the adapter's tokens)")
    ax.set_title("ALTO: co-located LoRA training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    import importlib

    for module in ("matplotlib.figure", "matplotlib.backends.backend_agg"):  # imported while the run trains
        importlib.import_module(module)

    given = sys.stdin.buffer.read()
    if given:
        job = json.loads(given)
        plot_losses(job["curves"], job["path"])
