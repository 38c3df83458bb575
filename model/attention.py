"""Self-attention for the two modes of the one layer stack (MODEL_SPEC 3.4).

Projections, q/k norms and RoPE run on packed rows of all work items; the attention product runs per item
(the exact path: on CPU float32 each item gets bitwise what it gets alone) or in one kernel call per batch of
items (`attention_batch`, the GPU path), with the same rules:
- encode (prompt chunk or committed block): causal over [cached ; new], writes the new K/V to the cache;
  sliding layers also mask keys older than W positions. The soft tokens of one image or video frame (a block)
  also see each other, both ways, on every layer (`use_bidirectional_attention: vision`, as the reference's
  `generate` builds its masks; a block lies whole in one pass).
- decode (denoise a canvas): bidirectional over [cached ; canvas], reads the cache and never writes it. Sliding
  layers see every cached key (the cache holds the last W-1): a block-anchored window, as the reference.
Attention scale is 1.0; V on full layers is the raw k projection; V is normed without a weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_batch import BatchPlan, Member, batches, in_same_block, run_batch, sdpa
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
    blocks: tuple[tuple[int, int], ...] = ()  # absolute [start, stop) of each image's soft tokens (encode only)


def _encode_mask(cached: int, new: int, first_pos: int, window: int | None, device,
                 blocks: tuple[tuple[int, int], ...] = ()) -> torch.Tensor | None:
    """Bool mask [new, cached + new] (True = attend); None when plain causal applies."""
    if cached == 0 and (window is None or new <= window) and not blocks:
        return None
    q_pos = first_pos + torch.arange(new, device=device)[:, None]
    k_pos = first_pos - cached + torch.arange(cached + new, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed | in_same_block(q_pos, k_pos, blocks)



def batch_plans(items: list[AttnItem], caches: list[LayerKV], window: int | None,
                device) -> list[BatchPlan | int]:
    """The pass's batches for layers like `caches`' (one kind): a plan per batch of several items, the item's index
    for a batch of one (which runs the per-item kernel). Cached key counts follow the items' order: an encoder
    item's rows are held by the time a later item of its request runs (at most W-1 of them on sliding layers)."""
    keep = caches[0].keep_last
    held: dict[int, int] = {}
    members = []
    for it, cache in zip(items, caches, strict=True):
        total = held.get(id(cache), cache.length)
        members.append(Member(it.start, it.stop, it.cache_start, total if keep is None else min(total, keep),
                              it.blocks))
        if it.encode:
            held[id(cache)] = total + it.stop - it.start
    out: list[BatchPlan | int] = []
    for group in batches([it.encode for it in items], [id(c) for c in caches]):
        if len(group) == 1:
            out.append(group[0])
        else:
            out.append(BatchPlan.build(group, [members[i] for i in group], items[group[0]].encode, window, device))
    return out


def project(x_ND: torch.Tensor, lw: LayerWeights, spec: LayerSpec, num_heads: int, eps: float,
            cos_N1d: torch.Tensor, sin_N1d: torch.Tensor,
            layout: RowLayout | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries [H, N, d], keys and values [Kv, N, d] of the packed rows: normed, keys and queries rotated."""
    N, d, kv = x_ND.shape[0], spec.head_dim, spec.num_kv_heads
    q = apply_rope(rms_norm(linear(x_ND, lw.q_proj, layout).view(N, num_heads, d), lw.q_norm, eps), cos_N1d, sin_N1d)
    k_raw = linear(x_ND, lw.k_proj, layout).view(N, kv, d)
    v_raw = linear(x_ND, lw.v_proj, layout).view(N, kv, d) if lw.v_proj is not None else k_raw
    k = apply_rope(rms_norm(k_raw, lw.k_norm, eps), cos_N1d, sin_N1d)
    v = rms_norm(v_raw, None, eps)
    return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)


def attend(q_HNd: torch.Tensor, k_KNd: torch.Tensor, v_KNd: torch.Tensor, spec: LayerSpec, items: list[AttnItem],
           caches: list[LayerKV], sliding_window: int, out_NHd: torch.Tensor, plans: dict | None = None) -> None:
    """The attention product of every item's rows into `out_NHd` [N, H, d] (encoder items append their keys).
    `plans`: None for a kernel call per item; a dict the caller keeps for one pass to run batches (filled on first
    use per layer kind, shared by the pass's layers of that kind)."""
    window = sliding_window if spec.is_sliding else None
    if plans is None:
        for item, cache in zip(items, caches, strict=True):
            item_attention(item, cache, q_HNd, k_KNd, v_KNd, window, out_NHd)
        return
    kind = "sliding" if spec.is_sliding else "full"
    if kind not in plans:
        plans[kind] = batch_plans(items, caches, window, q_HNd.device)
    for plan in plans[kind]:
        if isinstance(plan, int):
            item_attention(items[plan], caches[plan], q_HNd, k_KNd, v_KNd, window, out_NHd)
        else:
            run_batch(plan, q_HNd, k_KNd, v_KNd, [caches[i] for i in plan.items], out_NHd)


def attention(x_ND: torch.Tensor, lw: LayerWeights, spec: LayerSpec, num_heads: int, eps: float,
              cos_N1d: torch.Tensor, sin_N1d: torch.Tensor, items: list[AttnItem], caches: list[LayerKV],
              sliding_window: int, layout: RowLayout | None = None,
              plans: dict | None = None) -> torch.Tensor:
    """project, attend, output projection: the layer's attention block [N, D] (see `attend` for `plans`)."""
    q_HNd, k_KNd, v_KNd = project(x_ND, lw, spec, num_heads, eps, cos_N1d, sin_N1d, layout)
    N = x_ND.shape[0]
    out_NHd = torch.empty(N, num_heads, spec.head_dim, dtype=x_ND.dtype, device=x_ND.device)
    attend(q_HNd, k_KNd, v_KNd, spec, items, caches, sliding_window, out_NHd, plans)
    return linear(out_NHd.reshape(N, -1), lw.o_proj, layout)


def item_attention(item: AttnItem, cache: LayerKV, q_HNd: torch.Tensor, k_KNd: torch.Tensor, v_KNd: torch.Tensor,
              window: int | None, out_NHd: torch.Tensor) -> None:
    rows = slice(item.start, item.stop)
    k_new, v_new = k_KNd[:, rows], v_KNd[:, rows]
    cached = cache.length
    keys, values = cache.with_new(k_new, v_new)
    mask, causal = None, False
    if item.encode:
        mask = _encode_mask(cached, item.stop - item.start, item.cache_start, window, q_HNd.device, item.blocks)
        causal = mask is None
        cache.append(k_new, v_new)
    o = sdpa(q_HNd[None, :, rows], keys[None], values[None], mask, causal)
    out_NHd[rows] = o[0].transpose(0, 1)
