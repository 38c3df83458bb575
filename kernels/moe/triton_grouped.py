"""Grouped GEMM in Triton: all experts of a layer in one launch, with the group offsets on the device.

The grid is sized from what the host knows (P rows and E experts): at most ceil(P / BLOCK_M) + E row tiles, since
each expert adds at most one partial tile. A few torch ops on [E]-sized tensors give each tile its expert and
first row (a tile past the last expert's rows exits at once), so nothing is read back and the launch has the
same shape for any routing (a CUDA graph can hold it). Products accumulate in float32; float32 inputs multiply
exactly (no TF32), as the per-expert GEMMs they replace.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import interpreting

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32


@triton.jit
def _grouped_kernel(x_ptr, w_ptr, out_ptr, tile_expert_ptr, tile_row_ptr, ends_ptr,
                    N, K, E, stride_xm, stride_we, stride_wn, stride_om,
                    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tile, pn = tl.program_id(0), tl.program_id(1)
    e = tl.load(tile_expert_ptr + tile)
    if e < E:
        row0 = tl.load(tile_row_ptr + tile)
        end = tl.load(ends_ptr + e)
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask, cmask = rows < end, cols < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        w_base = w_ptr + e.to(tl.int64) * stride_we
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=cmask[None, :] & kmask[:, None],
                        other=0.0)
            if IEEE:  # float32 products exactly; 16-bit inputs widened (the interpreter has no bfloat16 dot)
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def tile_map(offs_E: torch.Tensor, rows: int, block_m: int = BLOCK_M) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row tile's expert (E past the last) and first row, [ceil(rows / block_m) + E] each, on the device."""
    E = offs_E.shape[0]
    ends = offs_E.to(torch.int64)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    tiles = (ends - starts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    n_tiles = -(-rows // block_m) + E
    t = torch.arange(n_tiles, device=offs_E.device)
    expert = torch.searchsorted(tile_end, t, right=True)
    first = torch.cat([tile_end.new_zeros(1), tile_end[:-1]])
    safe = expert.clamp(max=E - 1)
    row0 = starts[safe] + (t - first[safe]) * block_m
    return expert.to(torch.int32), row0.to(torch.int32)


def grouped_mm_triton(x_PK: torch.Tensor, w_ENK: torch.Tensor, offs_E: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """[P, N]; rows past offs[-1] are not written (`out`, when given, keeps what it holds there)."""
    P, K = x_PK.shape
    E, N, K2 = w_ENK.shape
    if K2 != K or offs_E.shape != (E,):
        raise ValueError(f"grouped_mm: x {tuple(x_PK.shape)}, w {tuple(w_ENK.shape)}, offs {tuple(offs_E.shape)}")
    out = x_PK.new_empty(P, N) if out is None else out
    if P == 0 or E == 0:
        return out
    x, w = x_PK.contiguous(), w_ENK.contiguous()
    expert, row0 = tile_map(offs_E, P)
    grid = (expert.shape[0], triton.cdiv(N, BLOCK_N))
    ieee = x.dtype == torch.float32 or interpreting()
    _grouped_kernel[grid](x, w, out, expert, row0, offs_E.to(torch.int32), N, K, E,
                          x.stride(0), w.stride(0), w.stride(1), out.stride(0),
                          IEEE=ieee, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out
