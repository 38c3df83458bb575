"""Self-attention for the two modes of the one layer stack (MODEL_SPEC 3.4).

Projections, q/k norms and RoPE run on packed rows of all work items; the attention product runs per item:
- encode (prompt chunk or committed block): causal over [cached ; new], writes the new K/V to the cache;
  sliding layers also mask keys older than W positions.
- decode (denoise a canvas): bidirectional over [cached ; canvas], reads the cache and never writes it. Sliding
  layers see every cached key (the cache holds the last W-1): a block-anchored window, as the reference.
Attention scale is 1.0; V on full layers is the raw k projection; V is normed without a weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache import LayerKV
from .config import LayerSpec
from .layers import RowLayout, apply_rope, linear, rms_norm
from .weights import LayerWeights


@dataclass(frozen=True, slots=True)
class AttnItem:
    """One work item's rows in a packed pass."""

    start: int
    stop: int
    cache_start: int  # absolute position of the item's first row
    encode: bool  # True: causal, writes KV; False: bidirectional canvas, read-only


def _encode_mask(cached: int, new: int, first_pos: int, window: int | None, device) -> torch.Tensor | None:
    """Bool mask [new, cached + new] (True = attend); None when plain causal applies."""
    if cached == 0 and (window is None or new <= window):
        return None
    q_pos = first_pos + torch.arange(new, device=device)[:, None]
    k_pos = first_pos - cached + torch.arange(cached + new, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def attention(x_ND: torch.Tensor, lw: LayerWeights, spec: LayerSpec, num_heads: int, eps: float,
              cos_N1d: torch.Tensor, sin_N1d: torch.Tensor, items: list[AttnItem], caches: list[LayerKV],
              sliding_window: int, layout: RowLayout | None = None) -> torch.Tensor:
    N, d, kv = x_ND.shape[0], spec.head_dim, spec.num_kv_heads
    q = apply_rope(rms_norm(linear(x_ND, lw.q_proj, layout).view(N, num_heads, d), lw.q_norm, eps), cos_N1d, sin_N1d)
    k_raw = linear(x_ND, lw.k_proj, layout).view(N, kv, d)
    v_raw = linear(x_ND, lw.v_proj, layout).view(N, kv, d) if lw.v_proj is not None else k_raw
    k = apply_rope(rms_norm(k_raw, lw.k_norm, eps), cos_N1d, sin_N1d)
    v = rms_norm(v_raw, None, eps)
    q_HNd, k_KNd, v_KNd = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)

    window = sliding_window if spec.is_sliding else None
    out_NHd = torch.empty(N, num_heads, d, dtype=x_ND.dtype, device=x_ND.device)
    for item, cache in zip(items, caches, strict=True):
        rows = slice(item.start, item.stop)
        k_new, v_new = k_KNd[:, rows], v_KNd[:, rows]
        cached = cache.length
        keys, values = cache.with_new(k_new, v_new)
        mask, causal = None, False
        if item.encode:
            mask = _encode_mask(cached, item.stop - item.start, item.cache_start, window, x_ND.device)
            causal = mask is None
            cache.append(k_new, v_new)
        o = F.scaled_dot_product_attention(q_HNd[None, :, rows], keys[None], values[None], attn_mask=mask,
                                           is_causal=causal, scale=1.0, enable_gqa=True)
        out_NHd[rows] = o[0].transpose(0, 1)
    return linear(out_NHd.reshape(N, num_heads * d), lw.o_proj, layout)
