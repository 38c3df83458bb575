"""Per-request KV cache: sliding layers keep only the last W-1 positions, full layers keep everything.

Keys are stored normed and rotated, values scale-free normed (MODEL_SPEC 3.4, 3.9), as [Kv, S, d].

Layout for many requests: every request owns its cache (freed the moment the request ends, by dropping it).
Full layers hold their positions in fixed-size pages ([Kv, page, d] each), so a growing request never copies
what it already holds and its footprint is known exactly in advance (`kv_bytes`), which is what the engine's
memory budget admits by. Sliding layers are a fixed window of W-1 positions. Attention concatenates a
request's pages with the new rows once per pass (it needs one contiguous key range per item on CPU; a paged
attention kernel would read the pages in place).

Prefixes (the engine's prefix cache): a cache can record its state when it reaches chosen positions (`want`), and
`snapshot(n)` returns that state as a `PrefixKV`; `KVCache.from_prefix` starts another request's cache from it.
No tensor is written in place below a holder's length, so holders share them: a full layer's whole pages by
reference (the last, partial page is copied by whoever continues from it, since it writes past the prefix), and a
sliding layer's window, which an append replaces by a new tensor rather than writing it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import TextConfig

DEFAULT_PAGE = 256


def _own(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy of it when it is a view into a larger storage (a window must not keep a pass's keys alive)."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


@dataclass(frozen=True, eq=False)
class PrefixKV:
    """A cache's state after its first `length` positions: per layer, its key and value tensors (a full layer's
    pages, the last one possibly partial; a sliding layer's window)."""

    length: int
    page_size: int
    layers: tuple[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]], ...]

    def tensors(self) -> list[torch.Tensor]:
        return [t for k, v in self.layers for t in (*k, *v)]


def distinct_bytes(tensors) -> int:
    """Bytes of the distinct tensors among `tensors` (shared pages count once). A cache's tensors are whole
    pages and compact windows, never views, so a tensor's address names its memory."""
    return sum({t.data_ptr(): t.nbytes for t in tensors}.values())


class LayerKV:
    def __init__(self, num_kv_heads: int, head_dim: int, keep_last: int | None, dtype: torch.dtype,
                 device: torch.device | str = "cpu", page_size: int = DEFAULT_PAGE):
        self.keep_last = keep_last  # W-1 on sliding layers, None on full layers
        self.kv, self.d, self.dtype, self.device, self.page = num_kv_heads, head_dim, dtype, device, page_size
        self._k: list[torch.Tensor] = []  # full: pages [Kv, page, d]; sliding: one tensor [Kv, <=W-1, d]
        self._v: list[torch.Tensor] = []
        self._len = 0  # valid positions held
        self._end = 0  # positions encoded so far (a sliding layer holds only the last W-1 of them)
        self._want: frozenset[int] = frozenset()  # positions whose state `append` records (prefix snapshots)
        self._snaps: dict[int, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = {}

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
            self._k = [_own(k[:, -self.keep_last:].contiguous())]
            self._v = [_own(v[:, -self.keep_last:].contiguous())]
            self._len = self._k[0].shape[1]
            self._end += k_KSd.shape[1]
            if self._end in self._want:
                self._snaps[self._end] = (tuple(self._k), tuple(self._v))
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
        self._end = self._len

    def nbytes(self) -> int:
        """Bytes held (whole pages on full layers)."""
        return sum(t.numel() * t.element_size() for t in self._k + self._v)

    def mark(self) -> tuple:
        """What `rollback` needs to undo later appends (the tensors are shared, not copied: an append writes a
        full layer's pages only past `length`, and replaces a sliding layer's window by a new tensor)."""
        return self._len, self._end, list(self._k), list(self._v)

    def rollback(self, mark: tuple) -> None:
        self._len, self._end, self._k, self._v = mark[0], mark[1], list(mark[2]), list(mark[3])
        self._snaps = {n: s for n, s in self._snaps.items() if n <= self._end}

    # -- prefixes ------------------------------------------------------------------------------------------
    def want(self, positions: frozenset[int]) -> None:
        """Record the layer's state whenever an append ends at one of `positions` (none: stop recording)."""
        self._want = positions
        if not positions:
            self._snaps = {}

    def state_at(self, n: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None:
        """The tensors holding positions [0, n) (a sliding layer: the window at n), shared; None if this layer
        cannot give them (a sliding layer that did not record n, or n past what is held)."""
        if n > self._end:
            return None
        if self.keep_last is None:
            pages = -(-n // self.page)
            return tuple(self._k[:pages]), tuple(self._v[:pages])
        if n == self._end:
            return tuple(self._k), tuple(self._v)
        return self._snaps.get(n)

    def start_from(self, n: int, k: tuple[torch.Tensor, ...], v: tuple[torch.Tensor, ...]) -> None:
        """Continue from another holder's state at `n`: whole pages shared, a partial last page copied (this
        layer writes past `n` in it); a sliding layer's window shared."""
        if self.keep_last is not None:
            self._k, self._v, self._len = list(k), list(v), (k[0].shape[1] if k else 0)
        else:
            self._k, self._v = list(k), list(v)
            if n % self.page:
                self._k[-1], self._v[-1] = self._k[-1].clone(), self._v[-1].clone()
            self._len = n
        self._end = n


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
        self.page_size = page_size
        self.length = 0

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in (*layer._k, *layer._v)]

    def mark(self) -> tuple:
        """A point to roll back to: a pass that failed half-way (some layers appended, others not) is undone, so
        the same pass can run again and write the very same cache."""
        return self.length, [layer.mark() for layer in self.layers]

    def rollback(self, mark: tuple) -> None:
        self.length = mark[0]
        for layer, m in zip(self.layers, mark[1], strict=True):
            layer.rollback(m)

    # -- prefixes ------------------------------------------------------------------------------------------
    def want(self, positions: frozenset[int]) -> None:
        """Record the state at each of `positions` as passes reach it (empty: forget what was recorded)."""
        for layer in self.layers:
            layer.want(positions)

    def snapshot(self, n: int) -> PrefixKV | None:
        """The state after the first `n` positions, sharing this cache's tensors; None if it was not recorded."""
        if n > self.length:
            return None
        parts = [layer.state_at(n) for layer in self.layers]
        if any(p is None for p in parts):
            return None
        return PrefixKV(n, self.page_size, tuple(parts))

    @classmethod
    def from_prefix(cls, cfg: TextConfig, dtype: torch.dtype, prefix: PrefixKV,
                    device: torch.device | str = "cpu") -> KVCache:
        """A cache that continues from `prefix`: positions [0, prefix.length) already encoded."""
        cache = cls(cfg, dtype, device, prefix.page_size)
        for layer, (k, v) in zip(cache.layers, prefix.layers, strict=True):
            layer.start_from(prefix.length, k, v)
        cache.length = prefix.length
        return cache
