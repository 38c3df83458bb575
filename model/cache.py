"""Per-request KV cache: sliding layers keep only the last W-1 positions, full layers keep everything.

Keys are stored normed and rotated, values scale-free normed (MODEL_SPEC 3.4, 3.9), as [Kv, S, d].

Layout for many requests: every request owns its cache (freed the moment the request ends, by dropping it).
Full layers hold their positions in fixed-size pages ([Kv, page, d] each), so a growing request never copies
what it already holds and its footprint is known exactly in advance (`kv_bytes`), which is what the engine's
memory budget admits by. Sliding layers are a fixed window of W-1 positions. Attention concatenates a
request's pages with the new rows once per pass (it needs one contiguous key range per item on CPU; a paged
attention kernel would read the pages in place).
"""

from __future__ import annotations

import torch

from .config import TextConfig

DEFAULT_PAGE = 256


class LayerKV:
    def __init__(self, num_kv_heads: int, head_dim: int, keep_last: int | None, dtype: torch.dtype,
                 device: torch.device | str = "cpu", page_size: int = DEFAULT_PAGE):
        self.keep_last = keep_last  # W-1 on sliding layers, None on full layers
        self.kv, self.d, self.dtype, self.device, self.page = num_kv_heads, head_dim, dtype, device, page_size
        self._k: list[torch.Tensor] = []  # full: pages [Kv, page, d]; sliding: one tensor [Kv, <=W-1, d]
        self._v: list[torch.Tensor] = []
        self._len = 0  # valid positions held

    @property
    def length(self) -> int:
        return self._len

    def _parts(self, pages: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.keep_last is not None:
            return pages
        parts, left = [], self._len
        for p in pages:
            if left <= 0:
                break
            parts.append(p[:, : min(left, self.page)])
            left -= self.page
        return parts

    def parts(self, which: str) -> list[torch.Tensor]:
        """The held keys ("k") or values ("v") as views [Kv, n, d] in position order, without a copy."""
        return self._parts(self._k if which == "k" else self._v)

    def with_new(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[cached ; new] keys and values [Kv, S + T, d], one copy each."""
        pk, pv = self._parts(self._k), self._parts(self._v)
        if not pk:
            return k_new, v_new
        return torch.cat([*pk, k_new], dim=1), torch.cat([*pv, v_new], dim=1)

    @property
    def keys(self) -> torch.Tensor:  # [Kv, S, d]
        parts = self._parts(self._k)
        return torch.cat(parts, dim=1) if parts else torch.empty(self.kv, 0, self.d, dtype=self.dtype)

    @property
    def values(self) -> torch.Tensor:
        parts = self._parts(self._v)
        return torch.cat(parts, dim=1) if parts else torch.empty(self.kv, 0, self.d, dtype=self.dtype)

    def append(self, k_KSd: torch.Tensor, v_KSd: torch.Tensor) -> None:
        if self.keep_last is not None:
            k, v = self.with_new(k_KSd, v_KSd)
            self._k, self._v = [k[:, -self.keep_last:].contiguous()], [v[:, -self.keep_last:].contiguous()]
            self._len = self._k[0].shape[1]
            return
        src, n = 0, k_KSd.shape[1]
        while src < n:
            page, off = divmod(self._len, self.page)
            if page == len(self._k):
                self._k.append(torch.empty(self.kv, self.page, self.d, dtype=self.dtype, device=self.device))
                self._v.append(torch.empty_like(self._k[-1]))
            take = min(self.page - off, n - src)
            self._k[page][:, off:off + take] = k_KSd[:, src:src + take]
            self._v[page][:, off:off + take] = v_KSd[:, src:src + take]
            src, self._len = src + take, self._len + take

    def nbytes(self) -> int:
        """Bytes held (whole pages on full layers)."""
        return sum(t.numel() * t.element_size() for t in self._k + self._v)

    def mark(self) -> tuple[int, list[torch.Tensor], list[torch.Tensor]]:
        """What `rollback` needs to undo later appends (the tensors are shared, not copied: an append writes a
        full layer's pages only past `length`, and replaces a sliding layer's window by a new tensor)."""
        return self._len, list(self._k), list(self._v)

    def rollback(self, mark: tuple[int, list[torch.Tensor], list[torch.Tensor]]) -> None:
        self._len, self._k, self._v = mark[0], list(mark[1]), list(mark[2])


def kv_bytes(cfg: TextConfig, positions: int, dtype: torch.dtype, page_size: int = DEFAULT_PAGE) -> int:
    """Bytes a request's cache holds after `positions` encoded positions (equals KVCache.nbytes)."""
    size = torch.empty((), dtype=dtype).element_size()
    pages = -(-positions // page_size)
    total = 0
    for s in cfg.layers:
        held = min(positions, cfg.sliding_window - 1) if s.is_sliding else pages * page_size
        total += 2 * held * s.num_kv_heads * s.head_dim * size
    return total


class KVCache:
    """The cache of one request. `length` is the number of positions encoded so far (the next position)."""

    def __init__(self, cfg: TextConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
                 page_size: int = DEFAULT_PAGE):
        window = cfg.sliding_window - 1
        self.layers = [LayerKV(s.num_kv_heads, s.head_dim, window if s.is_sliding else None, dtype, device,
                               page_size) for s in cfg.layers]
        self.length = 0

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def mark(self) -> tuple:
        """A point to roll back to: a pass that failed half-way (some layers appended, others not) is undone, so
        the same pass can run again and write the very same cache."""
        return self.length, [layer.mark() for layer in self.layers]

    def rollback(self, mark: tuple) -> None:
        self.length = mark[0]
        for layer, m in zip(self.layers, mark[1], strict=True):
            layer.rollback(m)
