"""Counter-based uniform noise for Gumbel-max sampling: a pure function of (key, column), so the torch reference
and the Triton kernel draw exactly the same numbers, in any order and in any chunking, with no [C, V] tensor.

`key` is a 32-bit integer per canvas row (the caller derives it from the request's seed, block, step and row);
the column's counter is mixed in with MurmurHash3's finaliser, and the top 24 bits give u in (0, 1).
"""

from __future__ import annotations

import torch

MASK = 0xFFFFFFFF
GOLDEN = 0x9E3779B1  # 2^32 / phi: spreads consecutive columns over the 32-bit range
M1, M2 = 0x85EBCA6B, 0xC2B2AE35  # MurmurHash3 fmix32


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding uint32 values (products wrap in int64; the low 32
    bits, kept by the mask, are the uint32 product's)."""
    x = x ^ (x >> 16)
    x = (x * M1) & MASK
    x = x ^ (x >> 13)
    x = (x * M2) & MASK
    return x ^ (x >> 16)


def uniform(key_R: torch.Tensor, cols_V: torch.Tensor) -> torch.Tensor:
    """u [R, V] in (0, 1), float32: row r's key with column v's counter."""
    x = fmix32(((cols_V.to(torch.int64) * GOLDEN) & MASK).unsqueeze(0) ^ (key_R.to(torch.int64) & MASK).unsqueeze(1))
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24)) + (0.5 / (1 << 24))


def gumbel(key_R: torch.Tensor, cols_V: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise [R, V]: -log(-log(u))."""
    return -torch.log(-torch.log(uniform(key_R, cols_V)))


def row_keys(seed: int | torch.Tensor, rows: int, device: torch.device | None = None) -> torch.Tensor:
    """Distinct 32-bit keys for `rows` rows from one 32-bit seed (a canvas step's draw; a tensor seed stays on its
    device, so nothing is read back)."""
    seed = seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, device=device)
    r = torch.arange(rows, dtype=torch.int64, device=seed.device)
    return fmix32((r * GOLDEN + fmix32(seed.to(torch.int64).reshape(()) & MASK)) & MASK)
