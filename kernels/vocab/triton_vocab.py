"""The fused vocabulary pass in Triton (see reference.py for the math), split over the vocabulary like flash
decoding: program (row block, split) walks its share of the vocabulary in chunks, keeping the online statistics
per row and its part of the self-conditioning sum in a float32 workspace [splits, R, D]; a few torch ops on
[splits, R] tensors merge the splits. Nothing of size [R, V] is ever written: the workspace is what
`sizes.triton_workspace_bytes` says (11.5 MB for a 256-row canvas of the real model with 4 splits)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import interpreting
from .reference import VocabOut
from .sizes import SPLITS


@triton.jit
def _fmix32(x):
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _round_bf16(x):
    """float32 -> the nearest bfloat16 (ties to even), kept in float32: by bits, because Triton's interpreter
    truncates in `.to(tl.bfloat16)` where the GPU rounds to nearest."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b in float32 accumulation; IEEE: exact float32 products (no TF32), and 16-bit inputs widened first
    (Triton's interpreter has no bfloat16 dot)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _vocab_kernel(h_ptr, e_ptr, temp_ptr, key_ptr, stat_ptr, idx_ptr, soft_ptr,
                  R, V, D, per_split, softcap,
                  SOFT: tl.constexpr, IEEE: tl.constexpr, ROUND: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_V: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid, split = tl.program_id(0), tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < R
    temp = tl.load(temp_ptr + rows, mask=rmask, other=1.0)
    key = tl.load(key_ptr + rows, mask=rmask, other=0).to(tl.uint32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    sz = tl.zeros([BLOCK_M], tl.float32)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    noisy = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK_M], tl.int32)
    noisy_i = tl.zeros([BLOCK_M], tl.int32)
    v_lo = split * per_split
    v_hi = tl.minimum(v_lo + per_split, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < v_hi
        logits = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < D
            h = tl.load(h_ptr + rows[:, None] * D + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            e = tl.load(e_ptr + cols[:, None] * D + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
            logits += _dot(h, tl.trans(e), IEEE)
        if ROUND:  # 16-bit weights: the logits in their dtype, as the LM head's GEMM returns them (reference.py)
            logits = _round_bf16(logits)
        t = 1.0 - 2.0 / (tl.exp(2.0 * logits / softcap) + 1.0)  # tanh
        z = tl.where(cmask[None, :], t * softcap / temp[:, None], float("-inf"))
        cm = tl.max(z, axis=1)
        ci = tl.argmax(z, axis=1, tie_break_left=True)
        better = cm > best
        best = tl.where(better, cm, best)
        best_i = tl.where(better, ci + v0, best_i)
        x = _fmix32((cols.to(tl.uint32) * 0x9E3779B1)[None, :] ^ key[:, None])
        u = (x >> 8).to(tl.float32) * (1.0 / 16777216.0) + (0.5 / 16777216.0)
        zn = tl.where(cmask[None, :], z - tl.log(-tl.log(u)), float("-inf"))
        nm = tl.max(zn, axis=1)
        ni = tl.argmax(zn, axis=1, tie_break_left=True)
        better = nm > noisy
        noisy = tl.where(better, nm, noisy)
        noisy_i = tl.where(better, ni + v0, noisy_i)
        m_new = tl.maximum(m, cm)
        alpha = tl.exp(m - m_new)
        p = tl.where(cmask[None, :], tl.exp(z - m_new[:, None]), 0.0)
        s = s * alpha + tl.sum(p, axis=1)
        sz = sz * alpha + tl.sum(tl.where(cmask[None, :], p * z, 0.0), axis=1)
        if SOFT:
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                dmask = ds < D
                where = soft_ptr + (split * R + rows[:, None]) * D + ds[None, :]
                part = tl.load(where, mask=rmask[:, None] & dmask[None, :], other=0.0)
                ed = tl.load(e_ptr + cols[:, None] * D + ds[None, :], mask=cmask[:, None] & dmask[None, :],
                             other=0.0)
                # p in the embedding's dtype, as soft_embedding rounds the probabilities: tensor cores for bf16
                part = part * alpha[:, None] + _dot(p.to(ed.dtype), ed, IEEE)
                tl.store(where, part, mask=rmask[:, None] & dmask[None, :])
        m = m_new
    at = split * R + rows
    tl.store(stat_ptr + 0 * (R * tl.num_programs(1)) + at, m, mask=rmask)
    tl.store(stat_ptr + 1 * (R * tl.num_programs(1)) + at, s, mask=rmask)
    tl.store(stat_ptr + 2 * (R * tl.num_programs(1)) + at, sz, mask=rmask)
    tl.store(stat_ptr + 3 * (R * tl.num_programs(1)) + at, best, mask=rmask)
    tl.store(stat_ptr + 4 * (R * tl.num_programs(1)) + at, noisy, mask=rmask)
    tl.store(idx_ptr + 0 * (R * tl.num_programs(1)) + at, best_i, mask=rmask)
    tl.store(idx_ptr + 1 * (R * tl.num_programs(1)) + at, noisy_i, mask=rmask)


def vocab_pass_triton(h_RD: torch.Tensor, embed_VD: torch.Tensor, softcap: float, temperature_R: torch.Tensor,
                      keys_R: torch.Tensor, soft: bool = True, splits: int = SPLITS,
                      blocks: tuple[int, int, int, int] | None = None) -> VocabOut:
    """The fused pass over R rows (one or more canvases). `blocks`: (BLOCK_M, BLOCK_V, BLOCK_K, BLOCK_D)."""
    R, D = h_RD.shape
    V = embed_VD.shape[0]
    dev = h_RD.device
    bm, bv, bk, bd = blocks or ((64, 64, 64, 64) if dev.type == "cuda" else (16, 32, 32, 32))
    per_split = triton.cdiv(triton.cdiv(V, splits), bv) * bv
    stats = torch.empty(5, splits, R, dtype=torch.float32, device=dev)
    idx = torch.empty(2, splits, R, dtype=torch.int32, device=dev)
    parts = torch.zeros(splits if soft else 1, R if soft else 1, D if soft else 1, dtype=torch.float32, device=dev)
    grid = (triton.cdiv(R, bm), splits)
    keys = keys_R.to(torch.int64) & 0xFFFFFFFF
    keys = torch.where(keys >= 2**31, keys - 2**32, keys).to(torch.int32)  # the same 32 bits, as int32
    ieee = h_RD.dtype == torch.float32 or interpreting()
    if embed_VD.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"vocab_pass_triton: embedding dtype {embed_VD.dtype}; float32 or bfloat16 expected")
    round16 = embed_VD.dtype == torch.bfloat16
    _vocab_kernel[grid](h_RD.contiguous(), embed_VD.contiguous(), temperature_R.float().contiguous(),
                        keys.contiguous(), stats, idx, parts, R, V, D, per_split, float(softcap), SOFT=soft,
                        IEEE=ieee, ROUND=round16, BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, BLOCK_D=bd)
    return merge(stats, idx, parts if soft else None)


def merge(stats: torch.Tensor, idx: torch.Tensor, parts: torch.Tensor | None) -> VocabOut:
    """The splits' statistics [5, S, R] and indices [2, S, R] (and soft parts [S, R, D]) -> one VocabOut."""
    m, s, sz, best, noisy = stats
    top = m.max(dim=0).values
    w = torch.exp(m - top)  # an empty split: exp(-inf) = 0
    total = (s * w).sum(0)
    lse = top + torch.log(total)
    entropy = lse - (sz * w).sum(0) / total
    first = best.argmax(dim=0, keepdim=True)  # ties: the first split, so the first index overall
    argmax = idx[0].gather(0, first)[0].long()
    sample = idx[1].gather(0, noisy.argmax(dim=0, keepdim=True))[0].long()
    soft = torch.einsum("sr,srd->rd", w, parts) / total.unsqueeze(-1) if parts is not None else None
    return VocabOut(lse, entropy, argmax, sample, soft)
