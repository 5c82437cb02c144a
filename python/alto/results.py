"""What a sweep's adapters are worth and what a finished sweep leaves: held-out losses (co-located
at evaluation points, and each final adapter's over the whole held-out set), the leaderboard, the
PEFT exports and the loss plot."""
from __future__ import annotations

import contextlib
import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from alto.base import Base
from alto.export import save_peft_adapter
from alto.model import LayerTensors, MultiLoraModel
from alto.registry import Adapter, Registry, Status
from alto.loss import mean_losses
from alto.train import colocated_losses

EVAL_BATCH = 16  # held-out sequences per forward


@contextlib.contextmanager
def _evaluating(model: MultiLoraModel):
    """No gradients and no dropout inside; the model trains again after."""
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train()


def held_out_losses(model: MultiLoraModel, adapter_ids: Sequence[str], eval_seqs: Sequence[Sequence[int]],
                    pad_id: int, device: torch.device) -> list[float]:
    """Every adapter's mean loss on the same first held-out sequences, in one co-located forward
    (the monitor's held-out signal)."""
    chunk = list(eval_seqs[:EVAL_BATCH])
    with _evaluating(model):
        batches = {aid: chunk for aid in adapter_ids}
        return mean_losses(colocated_losses(model, batches, pad_id, device, training=False)).tolist()


def held_out_loss(model: MultiLoraModel, adapter: Adapter, weights: dict[str, LayerTensors],
                  eval_seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> float:
    """Mean token loss of one adapter's `weights` on all held-out sequences (put back alone when the
    adapter is no longer in the model)."""
    in_model = adapter.id in model.configs
    if not in_model:
        model.add_adapters({adapter.id: adapter.config})
        model.load_adapter_weights(adapter.id, weights)
    total, count = 0.0, 0.0
    try:
        with _evaluating(model):
            for i in range(0, len(eval_seqs), EVAL_BATCH):
                batches = {adapter.id: eval_seqs[i : i + EVAL_BATCH]}
                chunk_sum, chunk_count = colocated_losses(model, batches, pad_id, device, training=False)
                total += chunk_sum.item()
                count += chunk_count.item()
    finally:
        if not in_model:
            model.remove_adapters([adapter.id])
    return total / max(1.0, count)


def finish(registry: Registry, weights_of: Callable[[str], dict[str, LayerTensors]],
           loss_of: Callable[[Adapter], float], base: Base, run_dir: Path, log=print) -> list[tuple[str, float]]:
    """Exports every adapter in PEFT format, writes leaderboard.csv (by held-out loss) and
    losses.png, and prints the leaderboard; returns (adapter, held-out loss) best first."""
    board = []
    for a in registry:
        loss = loss_of(a) if a.status != Status.FAILED else float("nan")
        board.append((a, loss))
        save_peft_adapter(weights_of(a.id), a, run_dir / "adapters" / a.id, base.name_or_path, base.gguf_file)
    board.sort(key=lambda x: (x[1] != x[1], x[1]))
    with open(run_dir / "leaderboard.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "adapter", "status", "steps", "train_loss_last", "eval_loss", "config"])
        for i, (a, loss) in enumerate(board, 1):
            w.writerow([i, a.id, a.status.value, a.step, a.losses[-1] if a.losses else "", f"{loss:.6f}",
                        a.config.to_dict()])
    log(f"\n{'#':>3}  {'adapter':<28}{'status':<15}{'steps':>6}{'eval loss':>11}")
    for i, (a, loss) in enumerate(board, 1):
        log(f"{i:>3}  {a.id:<28}{a.status.value:<15}{a.step:>6}{loss:>11.4f}")
    plot_losses(registry, run_dir / "losses.png")
    log(f"\nrun folder: {run_dir} (adapters/ in PEFT format, losses.csv, leaderboard.csv, losses.png)")
    return [(a.id, loss) for a, loss in board]


def plot_losses(registry: Registry, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for a in registry:
        line, = ax.plot(range(1, len(a.losses) + 1), a.losses, label=f"{a.id} ({a.status.value})", linewidth=1.2)
        if a.status == Status.STOPPED_EARLY and a.losses:  # where the monitor stopped it
            ax.plot(len(a.losses), a.losses[-1], "x", color=line.get_color(), markersize=9, markeredgewidth=2)
    ax.set_xlabel("micro-step of the adapter (x: stopped early)")
    ax.set_ylabel("training loss (mean over the adapter's tokens)")
    ax.set_title("ALTO: co-located LoRA training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
