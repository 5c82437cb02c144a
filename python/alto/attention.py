"""Variable-length attention for packed co-located steps: every adapter's sequences end to end in
one token stream ([1, T]), each attending only to itself (and, where the pass shares prefixes, to
its adapter's prefix in its first sequence's rows: alto.shared_prefixes).

Registered with transformers as the attention implementation "alto_varlen" (its mask function
builds no mask: the sequence boundaries travel as `cu_seq_lens_q` / `max_length_q`, the keyword
inputs TRL's padding-free collator gives flash-attention models). Position ids restart at every
sequence (or continue a shared prefix), so rotary embeddings see each sequence as if it were alone.

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
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from alto.shared_prefixes import SharedPrefixes

NAME = "alto_varlen"


def _no_mask(*_args, **_kwargs) -> None:
    """Packed steps carry their boundaries in cu_seq_lens_q: no mask tensor at all."""
    return None


@functools.cache
def _varlen_attn() -> tuple[Callable, bool] | None:
    """torch.nn.attention.varlen.varlen_attn (torch >= 2.11: causal is window_size=(-1, 0)) and
    whether it takes enable_gqa (later releases; 2.11 takes fewer key/value heads as they are), or
    None where the torch build has no varlen attention."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, "enable_gqa" in inspect.signature(varlen_attn).parameters


def _flash(q, k, v, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int, scale: float | None,
           window: int | None) -> torch.Tensor:
    """FlashAttention varlen over [T, H, D] (_varlen_attn() must not be None); a sequence with fewer
    queries than keys has its queries at its end (the kernel's causal mask is aligned bottom-right)."""
    varlen_attn, takes_gqa = _varlen_attn()
    left = -1 if window is None else window - 1  # transformers' sliding window: keys at distance < window
    kw = {"enable_gqa": k.shape[1] != q.shape[1]} if takes_gqa else {}
    return varlen_attn(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, scale=scale,
                       window_size=(left, 0), **kw)


def _per_sequence(q, k, v, cu_q: torch.Tensor, cu_k: torch.Tensor, scale: float | None,
                  window: int | None) -> torch.Tensor:
    """SDPA for each sequence of [T, H, D] alone (causal; sliding window if given), its queries the
    last of its keys' positions where it has fewer (as _flash)."""
    gqa = k.shape[1] != q.shape[1]
    out = []
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for q0, q1, k0, k1 in zip(bq[:-1], bq[1:], bk[:-1], bk[1:]):
        if q1 == q0:  # a bucketed step's zero-length sequences (alto.step_buckets)
            continue
        qs, ks, vs = q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1)  # [H, L, D]
        nq, nk = q1 - q0, k1 - k0
        if nq == nk and (window is None or nk <= window):
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            i, j = torch.arange(nk - nq, nk, device=q.device)[:, None], torch.arange(nk, device=q.device)[None, :]
            mask = (i >= j) if window is None else (i >= j) & (i - j < window)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out.append(o.transpose(0, 1))
    return torch.cat(out)


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     sliding_window: int | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                     max_length_q: int | None = None, shared_prefixes: SharedPrefixes | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature: query [1, H, T, D], key/value [1, Hkv, T, D] ->
    ([1, T, H, D], no weights). shared_prefixes: the pass's (alto.shared_prefixes): a sequence
    that runs from its first own token on attends to its adapter's prefix too."""
    if cu_seq_lens_q is None or max_length_q is None or query.shape[0] != 1:
        raise ValueError("alto_varlen attention needs one packed row with cu_seq_lens_q and max_length_q")
    if dropout or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError("packed steps have no attention dropout, logit soft-capping or attention sinks: "
                         "set packing: false for this model")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    cu_k, max_k = cu_seq_lens_q, max_length_q
    if shared_prefixes is not None:  # every sequence's keys and values whole, its queries its own rows
        k, v = shared_prefixes.keys_and_values(module.layer_idx, k, v)
        cu_k, max_k = shared_prefixes.cu_keys, shared_prefixes.max_keys
    flash_dtype_on_gpu = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
    if flash_dtype_on_gpu and _varlen_attn() is None:
        warnings.warn(f"torch {torch.__version__} has no varlen attention: SDPA per sequence (slower)", stacklevel=2)
    if flash_dtype_on_gpu and _varlen_attn() is not None:
        out = _flash(q, k, v, cu_seq_lens_q, cu_k, max_length_q, max_k, scaling, sliding_window)
    else:
        out = _per_sequence(q, k, v, cu_seq_lens_q, cu_k, scaling, sliding_window)
    return out.unsqueeze(0), None


def check_packable(config) -> None:
    """A ValueError if packed steps cannot run a model of this transformers config exactly (its
    attention soft-caps its logits, as Gemma 2's does): found when the base loads, not in a step."""
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError(f"packing: true, but {config.model_type} soft-caps its attention logits "
                         "(attn_logit_softcapping), which packed steps cannot: set packing: false")


def register() -> None:
    """Makes "alto_varlen" a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, _no_mask)
