"""Variable-length attention for packed co-located steps: every adapter's sequences end to end in
one token stream ([1, T]), each attending only to itself.

Registered with transformers as the attention implementation "alto_varlen" (its mask function
builds no mask: the sequence boundaries travel as `cu_seq_lens_q` / `max_length_q`, the keyword
inputs TRL's padding-free collator gives flash-attention models). Position ids restart at every
sequence, so rotary embeddings see each sequence as if it were alone.

Which kernel, and why:
- CUDA with bf16/fp16 activations (training on a GPU): torch's own `varlen_attn` (FlashAttention
  varlen, forward and backward, shipped with torch: no flash-attn build to match a CUDA and torch
  version; cost O(sum of L^2), memory O(T)).
- Otherwise (the CPU, float32/float64 exact checks): torch's SDPA once per sequence. transformers'
  own packed-sequence path for SDPA builds a dense [T, T] block-diagonal mask, quadratic in the
  tokens of the whole step (10 GB of mask for a 100k-token step); one call per sequence is exact
  and linear in memory.
"""
from __future__ import annotations

import functools
import inspect
import warnings

import torch
import torch.nn.functional as F

NAME = "alto_varlen"


def _no_mask(*_args, **_kwargs) -> None:
    """Packed steps carry their boundaries in cu_seq_lens_q: no mask tensor at all."""
    return None


@functools.cache
def _flash_options() -> dict | None:
    """Keyword arguments for torch.nn.attention.varlen.varlen_attn (its signature moved between torch
    releases: `is_causal` became `window_size=(-1, 0)`, `enable_gqa` appeared), or None where the
    torch build has no varlen attention."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return {"causal": "is_causal" in params, "window": "window_size" in params, "gqa": "enable_gqa" in params}


def _flash(q, k, v, cu: torch.Tensor, max_len: int, scale: float | None, window: int | None) -> torch.Tensor | None:
    """FlashAttention varlen over [T, H, D] (None where this torch cannot do it)."""
    opts = _flash_options()
    if opts is None or (window is not None and not opts["window"]):
        return None
    from torch.nn.attention.varlen import varlen_attn

    kw: dict = {"scale": scale}
    left = -1 if window is None else window - 1  # transformers' sliding window: keys at distance < window
    if opts["causal"]:
        kw["is_causal"] = True
        if window is not None:
            kw["window_size"] = (left, 0)
    else:
        kw["window_size"] = (left, 0)
    if opts["gqa"]:
        kw["enable_gqa"] = k.shape[1] != q.shape[1]
    cu = cu.to(torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)


def _per_sequence(q, k, v, cu: torch.Tensor, scale: float | None, window: int | None) -> torch.Tensor:
    """SDPA for each sequence of [T, H, D] alone (causal; sliding window if given)."""
    bounds = cu.tolist()
    gqa = k.shape[1] != q.shape[1]
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        n = end - start
        if window is not None and n > window:
            i = torch.arange(n, device=q.device)
            mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
        out.append(o.transpose(0, 1))
    return torch.cat(out)


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     sliding_window: int | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                     max_length_q: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature: query [1, H, T, D], key/value [1, Hkv, T, D] ->
    ([1, T, H, D], no weights)."""
    if cu_seq_lens_q is None or max_length_q is None or query.shape[0] != 1:
        raise ValueError("alto_varlen attention needs one packed row with cu_seq_lens_q and max_length_q")
    if dropout or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError("packed steps have no attention dropout, logit soft-capping or attention sinks: "
                         "set packing: false for this model")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    out = None
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        out = _flash(q, k, v, cu_seq_lens_q, max_length_q, scaling, sliding_window)
        if out is None:
            warnings.warn(f"torch {torch.__version__} has no varlen attention for this step: SDPA per sequence (slower)",
                          stacklevel=2)
    if out is None:
        out = _per_sequence(q, k, v, cu_seq_lens_q, scaling, sliding_window)
    return out.unsqueeze(0), None


def register() -> None:
    """Makes "alto_varlen" a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, _no_mask)
