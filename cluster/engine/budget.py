"""Admission by bytes: each admitted request holds a reservation covering its KV cache and its canvas.

A request's reservation is `request_bytes(positions)`: the KV cache after `positions` encoded positions (full
layers in whole pages, sliding layers capped at W-1: model.cache.kv_bytes) plus the sampler's per-canvas
workspace. With the exact sampler the workspace is what a canvas keeps between steps: its step's exponential
noise [C, V] float32 (drawn ahead on CPU), its self-conditioning embedding [C, D] and small vectors. With the
fused vocabulary pass it is the self-conditioning embedding, the small vectors and the pass's own scratch for the
canvas's rows (kernels.vocab.workspace_bytes): no [C, V] tensor. Reservations are made before the memory is used,
so the executor never holds more than the budget.
"""

from __future__ import annotations

import threading

import torch

from dgserve.kernels.vocab import workspace_bytes
from dgserve.model.cache import kv_bytes
from dgserve.model.config import ModelConfig


class MemorySizes:
    def __init__(self, config: ModelConfig, dtype: torch.dtype, page_size: int, fused: bool = False,
                 device: torch.device | str = "cpu"):
        """`fused`: canvases use the fused vocabulary pass on `device`."""
        self.config, self.dtype, self.page_size = config, dtype, page_size
        C, V, D = config.canvas_length, config.text.vocab_size, config.text.hidden_size
        small = 8 * C * 8
        if fused:
            self.canvas_bytes = C * D * dtype.itemsize + small + workspace_bytes(C, D, V, torch.device(device))
        else:
            self.canvas_bytes = C * V * 4 + C * D * 4 + small
        text, size = config.text, dtype.itemsize
        # one page of every full-attention layer, keys and values; a sliding layer's window per position held
        self.full_page_bytes = sum(2 * page_size * s.num_kv_heads * s.head_dim * size
                                   for s in text.layers if not s.is_sliding)
        self._window_row = sum(2 * s.num_kv_heads * s.head_dim * size for s in text.layers if s.is_sliding)

    def kv(self, positions: int) -> int:
        return kv_bytes(self.config.text, positions, self.dtype, self.page_size)

    def pages(self, positions: int) -> int:
        """Full-layer pages holding `positions` positions."""
        return -(-positions // self.page_size)

    def window_bytes(self, positions: int) -> int:
        """The sliding layers' windows after `positions` positions."""
        return min(positions, self.config.text.sliding_window - 1) * self._window_row

    def request(self, positions: int, image_tokens: int = 0) -> int:
        """A request's reservation: its KV at `positions`, its canvas, and the vision tower's rows of its images
        (`image_tokens` soft tokens, kept while it runs)."""
        rows = image_tokens * self.config.text.hidden_size * self.dtype.itemsize
        return self.kv(positions) + self.canvas_bytes + rows


PREFIX = "prefix"  # the reservation key of a rank's cached prefixes


class MemoryBudget:
    """Reservations by request id (or PREFIX, the cached prefixes) against a fixed capacity (thread-safe reads for
    metrics)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._held: dict[int | str, int] = {}
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        with self._lock:
            return sum(self._held.values())

    def held(self, rid: int | str) -> int:
        return self._held.get(rid, 0)

    def try_set(self, rid: int | str, nbytes: int) -> bool:
        """Make rid's reservation `nbytes` (grow or shrink); False, and nothing changed, if it would not fit."""
        with self._lock:
            other = sum(self._held.values()) - self._held.get(rid, 0)
            if other + nbytes > self.capacity:
                return False
            self._held[rid] = nbytes
            return True

    def free(self, rid: int | str) -> None:
        with self._lock:
            self._held.pop(rid, None)
