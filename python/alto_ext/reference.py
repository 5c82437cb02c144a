"""Float64 oracle for the segmented LoRA ops: a plain per-adapter loop in PyTorch, sharing nothing
with the library's kernels. Used by the tests and by ``alto check``."""
from __future__ import annotations

import torch

from alto_ext import Segments


def _ranges(seg: Segments):
    t0 = r0 = 0
    for n, r in zip(seg.token_counts, seg.ranks):
        yield t0, n, r0, r
        t0 += n
        r0 += r


def _scale(seg: Segments, g: int) -> float:
    return 1.0 if seg.scaling is None else float(seg.scaling[g])


def shrink(x, W, seg: Segments, h_width: int) -> torch.Tensor:
    h = torch.zeros(x.shape[0], h_width, dtype=torch.float64)
    for g, (t0, n, r0, r) in enumerate(_ranges(seg)):
        h[t0 : t0 + n, :r] = _scale(seg, g) * (x[t0 : t0 + n].double() @ W[r0 : r0 + r].double().T)
    return h


def expand(y, h, W, seg: Segments) -> torch.Tensor:
    out = y.double().clone()
    for g, (t0, n, r0, r) in enumerate(_ranges(seg)):
        out[t0 : t0 + n] += _scale(seg, g) * (h[t0 : t0 + n, :r].double() @ W[r0 : r0 + r].double())
    return out


def weight_grad(h, x, seg: Segments, total_rank: int) -> torch.Tensor:
    out = torch.zeros(total_rank, x.shape[1], dtype=torch.float64)
    for g, (t0, n, r0, r) in enumerate(_ranges(seg)):
        out[r0 : r0 + r] = _scale(seg, g) * (h[t0 : t0 + n, :r].double().T @ x[t0 : t0 + n].double())
    return out


def lora_linear(x, weight, bias, A, B, seg: Segments, lora_x=None) -> torch.Tensor:
    """Differentiable float64 multi-adapter LoRA linear, one adapter at a time."""
    lx = x if lora_x is None else lora_x
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    parts = []
    for g, (t0, n, r0, r) in enumerate(_ranges(seg)):
        delta = (lx[t0 : t0 + n] @ A[r0 : r0 + r].T) @ B[r0 : r0 + r]
        parts.append(y[t0 : t0 + n] + _scale(seg, g) * delta)
    return torch.cat(parts) if parts else y


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert not torch.isnan(out).any(), "NaN in output"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)
