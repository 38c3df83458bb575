"""Per-request KV cache: sliding layers keep only the last W-1 positions, full layers keep everything.

Keys are stored normed and rotated, values scale-free normed (MODEL_SPEC 3.4, 3.9), as [Kv, S, d].
Full layers grow by capacity doubling so a long generation does not copy its cache on every block.
"""

from __future__ import annotations

import torch

from .config import TextConfig


class LayerKV:
    def __init__(self, num_kv_heads: int, head_dim: int, keep_last: int | None, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.keep_last = keep_last  # W-1 on sliding layers, None on full layers
        self._k = torch.empty(num_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self._v = torch.empty_like(self._k)
        self._len = 0  # valid positions held

    @property
    def keys(self) -> torch.Tensor:  # [Kv, S, d]
        return self._k[:, : self._len]

    @property
    def values(self) -> torch.Tensor:
        return self._v[:, : self._len]

    def append(self, k_KSd: torch.Tensor, v_KSd: torch.Tensor) -> None:
        if self.keep_last is not None:
            self._k = torch.cat([self.keys, k_KSd], dim=1)[:, -self.keep_last:].contiguous()
            self._v = torch.cat([self.values, v_KSd], dim=1)[:, -self.keep_last:].contiguous()
            self._len = self._k.shape[1]
            return
        need = self._len + k_KSd.shape[1]
        if need > self._k.shape[1]:
            cap = max(need, 2 * self._k.shape[1], 64)
            for name in ("_k", "_v"):
                old = getattr(self, name)
                new = old.new_empty(old.shape[0], cap, old.shape[2])
                new[:, : self._len] = old[:, : self._len]
                setattr(self, name, new)
        self._k[:, self._len:need] = k_KSd
        self._v[:, self._len:need] = v_KSd
        self._len = need

    def nbytes(self) -> int:
        return 2 * self._len * self._k.shape[0] * self._k.shape[2] * self._k.element_size()


class KVCache:
    """The cache of one request. `length` is the number of positions encoded so far (the next position)."""

    def __init__(self, cfg: TextConfig, dtype: torch.dtype, device: torch.device | str = "cpu"):
        window = cfg.sliding_window - 1
        self.layers = [LayerKV(s.num_kv_heads, s.head_dim, window if s.is_sliding else None, dtype, device)
                       for s in cfg.layers]
        self.length = 0

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

