"""The attention product of many work items in one kernel call per batch (the GPU path).

Items of one pass are put in batches: the canvases (bidirectional, read-only) in one, encoder items in waves
(an item goes one wave after an earlier encoder item of the same request, so it sees that item's keys). A batch
of B items runs as one `scaled_dot_product_attention` over padded [B, Kv, L_max, d] keys built by one `torch.cat`
of every item's cached pages, new rows and a zero pad, with a bool mask that carries the rules of
MODEL_SPEC 3.4 by absolute positions:

- canvas rows see every valid key ([cached ; canvas]: sliding layers hold only the last W-1 positions, so a
  canvas sees the block-anchored window, as the reference);
- encoder rows see keys at or before their position and, on sliding layers, newer than W positions back; the
  soft tokens of one image or frame (a member's `blocks`) see each other.

Canvas queries fold their G = H / Kv query heads into the query length ([B, Kv, G*T, d]), so the mask is one
row per item and any SDPA backend takes it without repeating K/V. Padded query rows attend to key 0 (never a
fully masked row) and are dropped. Everything the batch needs is known on the host from cache lengths (Python
ints), so nothing is read back from the device.

On CPU float32 a padded kernel does not give an item bitwise what it gets alone (the reduction over a longer,
masked key range rounds differently), so the exact path (a kernel call per item) stays the CPU default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache import LayerKV


@dataclass(frozen=True, slots=True)
class Member:
    """One item of a batch: its rows in the packed pass, its absolute first position, its cached key count."""

    start: int
    stop: int
    first_pos: int
    cached: int
    blocks: tuple[tuple[int, int], ...] = ()  # absolute [start, stop) of bidirectional image blocks

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def keys(self) -> int:
        return self.cached + self.rows


def in_same_block(q_pos: torch.Tensor, k_pos: torch.Tensor, blocks: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Query/key pairs (broadcast positions) inside one block: an image's soft tokens see each other."""
    both = torch.zeros(torch.broadcast_shapes(q_pos.shape, k_pos.shape), dtype=torch.bool, device=q_pos.device)
    for a, b in blocks:
        both |= (q_pos >= a) & (q_pos < b) & (k_pos >= a) & (k_pos < b)
    return both


def batches(encode: list[bool], cache_ids: list[int]) -> list[list[int]]:
    """Item indices grouped into the batches that run one kernel call each, in the order they must run: encoder
    waves first, then all canvases. A canvas that precedes an encoder item of its own request in the pass would
    have to run before that item writes its keys: the engine never plans it, and it is refused."""
    waves: list[list[int]] = []
    canvases: list[int] = []
    encoded: dict[int, int] = {}
    denoised: set[int] = set()
    for i, (enc, key) in enumerate(zip(encode, cache_ids, strict=True)):
        if not enc:
            denoised.add(key)
            canvases.append(i)
            continue
        if key in denoised:
            raise ValueError(f"work item {i} encodes for a request whose canvas comes earlier in the same pass")
        wave = encoded.get(key, 0)
        encoded[key] = wave + 1
        if wave == len(waves):
            waves.append([])
        waves[wave].append(i)
    return waves + ([canvases] if canvases else [])


@dataclass(frozen=True)
class BatchPlan:
    """Index tensors of one batch, shared by every layer of one kind (sliding or full) in a pass."""

    items: tuple[int, ...]  # the batch's items (indices in the pass)
    members: tuple[Member, ...]
    encode: bool
    q_index: torch.Tensor  # [B * T_max] packed row of each padded query row
    mask: torch.Tensor  # bool [B, 1, T_max, L_max] (encode) or [B, 1, 1, L_max] (canvas); True = attend
    src: torch.Tensor  # [n] padded query rows that are real ...
    dst: torch.Tensor  # [n] ... and their packed rows
    t_max: int
    l_max: int

    @classmethod
    def build(cls, items: list[int], members: list[Member], encode: bool, window: int | None,
              device) -> BatchPlan:
        """Index tensors made on the host from the members' sizes and sent with one non-blocking copy (nothing
        waits for the device); masks computed on the device."""
        t_max, l_max = max(m.rows for m in members), max(m.keys for m in members)
        B = len(members)
        rows = torch.tensor([m.rows for m in members])
        t = torch.arange(t_max)
        q_index = (torch.tensor([m.start for m in members])[:, None] + torch.minimum(t[None], rows[:, None] - 1))
        src = torch.cat([b * t_max + torch.arange(m.rows) for b, m in enumerate(members)])
        fields = torch.tensor([[m.keys, m.first_pos, m.cached, m.rows] for m in members]).T  # [4, B]
        host = torch.cat([q_index.reshape(-1), src, fields.reshape(-1)])
        if torch.device(device).type == "cuda":
            host = host.pin_memory()
        dev = host.to(device, non_blocking=True)
        n_q, n_src = B * t_max, src.shape[0]
        q_index_d, src_d = dev[:n_q], dev[n_q:n_q + n_src]
        keys, first, cached, rows_d = dev[n_q + n_src:].view(4, B, 1)
        k = torch.arange(l_max, device=device)[None]  # [1, L]
        k_valid = k < keys  # [B, L]
        if encode:
            tq = torch.arange(t_max, device=device)[None]  # [1, T]
            q_pos = (first + tq)[:, :, None]  # [B, T, 1]
            k_pos = (first - cached + k)[:, None, :]  # [B, 1, L]
            allowed = k_valid[:, None, :] & (k_pos <= q_pos)
            if window is not None:
                allowed &= k_pos > q_pos - window
            for b, m in enumerate(members):
                if m.blocks:
                    allowed[b] |= in_same_block(q_pos[b], k_pos[b], m.blocks) & k_valid[b][None, :]
            padded_q = (tq >= rows_d)[:, :, None]  # [B, T, 1]
            allowed |= padded_q & (k == 0)[:, None, :]  # padded rows: key 0, never fully masked
            mask = allowed[:, None]  # [B, 1, T, L]
        else:
            mask = k_valid[:, None, None, :]  # [B, 1, 1, L]
        return cls(tuple(items), tuple(members), encode, q_index_d, mask, src_d, q_index_d[src_d], t_max, l_max)


def sdpa(q_BHTd: torch.Tensor, k_BKLd: torch.Tensor, v_BKLd: torch.Tensor, mask: torch.Tensor | None,
         causal: bool, fold: bool | None = None) -> torch.Tensor:
    """Attention with scale 1 and grouped KV heads (H = G x Kv; query head h reads KV head h // G) -> [B, H, T, d].

    `fold` (default: off CPU): the G query heads of a KV head go into the query length ([B, Kv, G*T, d], the mask
    repeated per head), so a mask goes to the memory-efficient kernel, which has no grouped-query support: with
    `enable_gqa` and a mask SDPA would fall back to its math kernel and materialise float32 scores of
    [B, H, T, L]. A causal pass without a mask in 16-bit with d <= 256 stays unfolded (flash attention takes
    grouped heads). On CPU, SDPA's own grouped path: the exact path's numerics."""
    B, H, T, d = q_BHTd.shape
    Kv = k_BKLd.shape[1]
    G = H // Kv
    fold = q_BHTd.device.type != "cpu" if fold is None else fold
    flash = causal and mask is None and q_BHTd.dtype in (torch.float16, torch.bfloat16) and d <= 256
    if not fold or G == 1 or flash:
        return F.scaled_dot_product_attention(q_BHTd, k_BKLd, v_BKLd, attn_mask=mask, is_causal=causal, scale=1.0,
                                              enable_gqa=G > 1)
    if causal:  # top-left aligned, as SDPA's is_causal: query t reads keys 0..t
        L = k_BKLd.shape[2]
        mask = torch.ones(T, L, dtype=torch.bool, device=q_BHTd.device).tril()
    if mask is not None and mask.shape[-2] > 1:  # one row per query: one per folded row [b, 1, G*T, L]
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).repeat(1, 1, G, 1)
    o = F.scaled_dot_product_attention(q_BHTd.reshape(B, Kv, G * T, d), k_BKLd, v_BKLd, attn_mask=mask, scale=1.0)
    return o.reshape(B, H, T, d)


def _padded(parts_per_item: list[list[torch.Tensor]], keys: list[int], l_max: int) -> torch.Tensor:
    """[Kv, S_i, d] parts per item -> [B, Kv, L_max, d] with one cat (each item padded with zeros to L_max)."""
    ref = parts_per_item[0][-1]
    pad = ref.new_zeros(ref.shape[0], l_max, ref.shape[2])
    flat = []
    for parts, n in zip(parts_per_item, keys, strict=True):
        flat += parts
        if n < l_max:
            flat.append(pad[:, : l_max - n])
    B = len(parts_per_item)
    return torch.cat(flat, dim=1).view(ref.shape[0], B, l_max, ref.shape[2]).transpose(0, 1)


def run_batch(plan: BatchPlan, q_HNd: torch.Tensor, k_KNd: torch.Tensor, v_KNd: torch.Tensor,
              caches: list[LayerKV], out_NHd: torch.Tensor) -> None:
    """One kernel call for the batch's items; writes their rows of `out_NHd` and appends encoder items' keys."""
    H, d, Kv = q_HNd.shape[0], q_HNd.shape[2], k_KNd.shape[0]
    B, T = len(plan.members), plan.t_max
    k_parts, v_parts = [], []
    for m, cache in zip(plan.members, caches, strict=True):
        if cache.length != m.cached:
            raise RuntimeError(f"a batch planned for {m.cached} cached keys found {cache.length}")
        rows = slice(m.start, m.stop)
        k_parts.append([*cache.parts("k"), k_KNd[:, rows]])
        v_parts.append([*cache.parts("v"), v_KNd[:, rows]])
    keys = [m.keys for m in plan.members]
    k_BKLd, v_BKLd = _padded(k_parts, keys, plan.l_max), _padded(v_parts, keys, plan.l_max)
    if plan.encode:
        for m, cache in zip(plan.members, caches, strict=True):
            cache.append(k_KNd[:, m.start:m.stop], v_KNd[:, m.start:m.stop])
    q_BHTd = q_HNd[:, plan.q_index].view(H, B, T, d).transpose(0, 1)
    if plan.encode:
        o = sdpa(q_BHTd, k_BKLd, v_BKLd, plan.mask, causal=False)
    else:  # the G query heads of a KV head folded into the query length: [B, Kv, G*T, d]; one mask row per item
        q_fold = q_BHTd.reshape(B, Kv, (H // Kv) * T, d)
        o = F.scaled_dot_product_attention(q_fold, k_BKLd, v_BKLd, attn_mask=plan.mask, scale=1.0)
    o_NHd = o.reshape(B, H, T, d).transpose(1, 2).reshape(B * T, H, d)
    out_NHd[plan.dst] = o_NHd[plan.src]
