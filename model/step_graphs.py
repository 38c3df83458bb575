"""The decoder step of up to 32 canvases as CUDA graphs, captured at start at fixed canvas counts (1, 2, 4, 8, 16,
32): a step of n canvases runs the graph of the smallest count >= n, its other canvases padding.

Piecewise, as vLLM captures: the attention product stays outside the graphs (its key count changes with every
request's context), everything else is captured. Piece 0 is the decoder input (embedding, self-conditioning MLP),
the rotary tables and layer 0's q/k/v; piece i (1..L-1) is layer i-1 after its attention (output projection,
residual, dense MLP, router, experts in grouped GEMMs, layer scalar) and layer i's q/k/v; piece L ends the last
layer and applies the final norm. Between pieces, `attention.attend` reads the pieces' q/k/v and writes the
attention output into a static buffer the next piece reads. Every input lives in a static buffer (canvas ids, the
self-conditioning input, zeros where a canvas has none, which adds exactly zero; positions), so a step copies its
inputs in, replays L + 1 graphs with L attention calls between them, and reads the hidden rows out.

Without CUDA (or with capture off) the same pieces run eagerly on the same static buffers: the fixed-shape step
the tests run on CPU. What still synchronises with the host in a step is outside these graphs: the sampler's stop
decision (mean entropy, stability: whether the block goes on is a host decision), and a draft stream's argmax
read. Graphs hold only local experts: an exchange with expert ranks sizes its transfers on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .attention import AttnItem, attend, project
from .layers import linear, rope_cos_sin
from .transformer import DiffusionGemma, WorkItem

BUCKETS = (1, 2, 4, 8, 16, 32)


@dataclass
class _Bucket:
    """Static buffers, pieces and graphs of one canvas count."""

    canvases: int
    ids: torch.Tensor  # [R] canvas ids, R = canvases x C
    soft: torch.Tensor  # [R, D] self-conditioning input (zeros: none)
    positions: torch.Tensor  # [R]
    attn: dict[str, torch.Tensor]  # layer kind -> attention output [R, H, d]
    pieces: list[Callable[[], tuple]] = field(default_factory=list)
    outs: list[tuple] = field(default_factory=list)
    graphs: list = field(default_factory=list)  # torch.cuda.CUDAGraph per piece, once captured


class DecoderGraphs:
    def __init__(self, model: DiffusionGemma, buckets: tuple[int, ...] = BUCKETS, capture: bool | None = None):
        """`capture`: record CUDA graphs (default: on CUDA); otherwise the pieces run eagerly."""
        self.model, self.C = model, model.config.canvas_length
        self.buckets = {b: self._bucket(b) for b in sorted(set(buckets))}
        self.captured = model.device.type == "cuda" if capture is None else capture
        with torch.inference_mode():
            if self.captured:
                self._capture()
            else:
                for b in self.buckets.values():
                    b.outs = [None] * len(b.pieces)

    @property
    def max_canvases(self) -> int:
        return max(self.buckets)

    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    # -- building ------------------------------------------------------------------------------------------
    def _bucket(self, canvases: int) -> _Bucket:
        m, R = self.model, canvases * self.C
        cfg, dev = m.cfg, m.device
        attn = {}
        for spec in cfg.layers:
            kind = "sliding" if spec.is_sliding else "full"
            attn.setdefault(kind, torch.zeros(R, cfg.num_attention_heads, spec.head_dim, dtype=m.dtype, device=dev))
        b = _Bucket(canvases, torch.zeros(R, dtype=torch.long, device=dev),
                    torch.zeros(R, cfg.hidden_size, dtype=m.dtype, device=dev),
                    torch.zeros(R, dtype=torch.long, device=dev), attn)
        b.pieces = [self._first(b)] + [self._middle(b, i) for i in range(1, cfg.num_layers)] + [self._last(b)]
        return b

    def _qkv(self, i: int, h: torch.Tensor, rope: dict) -> tuple:
        m, spec = self.model, self.model.cfg.layers[i]
        cos, sin = rope[spec.kind]
        return project(m.attention_input(i, h), m.weights.layers[i], spec, m.cfg.num_attention_heads,
                       m.cfg.rms_norm_eps, cos, sin)

    def _layer_end(self, b: _Bucket, i: int, h: torch.Tensor) -> torch.Tensor:
        m, spec = self.model, self.model.cfg.layers[i]
        lw = m.weights.layers[i]
        a = linear(b.attn["sliding" if spec.is_sliding else "full"].reshape(h.shape[0], -1), lw.o_proj)
        return m.after_attention(i, h, a) * lw.layer_scalar

    def _first(self, b: _Bucket) -> Callable[[], tuple]:
        def piece():
            m = self.model
            h = m.decoder_input(b.ids, b.soft)
            rope = {kind: rope_cos_sin(inv, b.positions, m.dtype) for kind, inv in m.inv_freq.items()}
            return h, rope, *self._qkv(0, h, rope)
        return piece

    def _middle(self, b: _Bucket, i: int) -> Callable[[], tuple]:
        def piece():
            h, rope = b.outs[i - 1][0], b.outs[0][1]
            h = self._layer_end(b, i - 1, h)
            return h, rope, *self._qkv(i, h, rope)
        return piece

    def _last(self, b: _Bucket) -> Callable[[], tuple]:
        L = self.model.cfg.num_layers

        def piece():
            return (self.model.final_norm(self._layer_end(b, L - 1, b.outs[L - 1][0])),)
        return piece

    def _capture(self) -> None:
        """Warm up every piece on a side stream (Triton compiles, cuBLAS picks kernels), then capture them in order
        into one memory pool, largest bucket first (smaller ones reuse its memory)."""
        pool = torch.cuda.graph_pool_handle()
        for b in sorted(self.buckets.values(), key=lambda x: -x.canvases):
            b.outs = [None] * len(b.pieces)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for j, piece in enumerate(b.pieces):
                    b.outs[j] = piece()
            torch.cuda.current_stream().wait_stream(side)
            b.graphs = []
            for j, piece in enumerate(b.pieces):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    b.outs[j] = piece()
                b.graphs.append(g)

    # -- a step --------------------------------------------------------------------------------------------
    def _piece(self, b: _Bucket, j: int) -> None:
        if self.captured:
            b.graphs[j].replay()
        else:
            b.outs[j] = b.pieces[j]()

    @torch.inference_mode()
    def run(self, items: list[WorkItem], on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Final-normed hidden rows [n x C, D] of n canvases (a copy: the static buffers are reused)."""
        n = len(items)
        size = self.bucket_for(n)
        if size is None or not items or any(it.encode or it.ids.shape[0] != self.C for it in items):
            raise ValueError(f"the step graphs take 1..{self.max_canvases} canvases of {self.C} rows; got "
                             f"{[(it.ids.shape[0], 'encode' if it.encode else 'canvas') for it in items]}")
        b, C, m = self.buckets[size], self.C, self.model
        starts = [it.cache.length for it in items]
        positions = (torch.tensor(starts)[:, None] + torch.arange(C)[None]).reshape(-1)
        if m.device.type == "cuda":
            positions = positions.pin_memory()
        b.positions[:n * C].copy_(positions, non_blocking=True)
        b.ids[:n * C].copy_(torch.cat([it.ids for it in items]) if n > 1 else items[0].ids)
        if all(it.soft_CD is None for it in items):
            b.soft[:n * C].zero_()
        else:
            zeros = b.soft.new_zeros(C, b.soft.shape[1])
            b.soft[:n * C].copy_(torch.cat([zeros if it.soft_CD is None else it.soft_CD for it in items]))
        attn_items = [AttnItem(j * C, (j + 1) * C, s, False) for j, s in enumerate(starts)]
        plans = {} if m.batched_attention else None
        self._piece(b, 0)
        for i, spec in enumerate(m.cfg.layers):
            _, _, q, k, v = b.outs[i]
            attend(q, k, v, spec, attn_items, [it.cache.layers[i] for it in items], m.cfg.sliding_window,
                   b.attn["sliding" if spec.is_sliding else "full"], plans)
            self._piece(b, i + 1)
            if on_layer is not None:
                on_layer(i)
        return b.outs[-1][0][:n * C].clone()
