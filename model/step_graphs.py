"""The decoder step of up to 32 canvases as CUDA graphs, captured at start at fixed canvas counts (1, 2, 3, 4, 6,
8, 12, 16, 24, 32: at most a third of a step is padding): a step of n canvases runs the graph of the smallest
count >= n, its other canvases padding.

Piecewise, as vLLM captures: the attention product stays outside the graphs (its key count changes with every
request's context), everything else is captured. Piece 0 is the decoder input (embedding, self-conditioning MLP),
the rotary tables and layer 0's q/k/v; piece i (1..L-1) is layer i-1 after its attention (output projection,
residual, dense MLP, router, experts in grouped GEMMs, layer scalar) and layer i's q/k/v; piece L ends the last
layer and applies the final norm. Between pieces, `attention.attend` reads the q/k/v buffers and writes the
attention output into a buffer the next piece reads.

Every tensor a piece reads or leaves for the next one is a static buffer, written inside the graph by a copy:
the canvas ids, the self-conditioning input (zeros where a canvas has none, which adds exactly zero), positions,
the rotary tables, the hidden rows, q/k/v and the attention output per layer kind. Buffers are allocated once for
the largest count and every count uses their first rows, so the graphs' own memory is one pool that holds only
a piece's temporaries. A step copies its inputs in, replays L + 1 graphs with L attention calls between them,
and reads the hidden rows out.

Without CUDA (or with capture off) the same pieces run eagerly on the same buffers: the fixed-shape step the tests
run on CPU. What still synchronises with the host in a step is outside these graphs: the sampler's stop decision
(mean entropy, stability: whether the block goes on is a host decision), and a draft stream's argmax read. Graphs
hold only local experts: an exchange with expert ranks sizes its transfers on the host.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .attention import AttnItem, attend, project
from .layers import linear, rope_cos_sin
from .transformer import DiffusionGemma, WorkItem

BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def _kind(spec) -> str:
    return "sliding" if spec.is_sliding else "full"


class _Buffers:
    """The static tensors of the largest count; a count of n canvases uses rows [0, n x C)."""

    def __init__(self, model: DiffusionGemma, rows: int):
        cfg, dev, dt = model.cfg, model.device, model.dtype
        H, D = cfg.num_attention_heads, cfg.hidden_size
        self.ids = torch.zeros(rows, dtype=torch.long, device=dev)
        self.soft = torch.zeros(rows, D, dtype=dt, device=dev)
        self.positions = torch.zeros(rows, dtype=torch.long, device=dev)
        self.h = torch.zeros(rows, D, dtype=dt, device=dev)
        self.rope, self.q, self.k, self.v, self.attn = {}, {}, {}, {}, {}
        for spec in cfg.layers:
            kind, d, kv = _kind(spec), spec.head_dim, spec.num_kv_heads
            if kind in self.q:
                continue
            self.rope[kind] = (torch.zeros(rows, 1, d, dtype=dt, device=dev), torch.zeros(rows, 1, d, dtype=dt,
                                                                                          device=dev))
            self.q[kind] = torch.zeros(H, rows, d, dtype=dt, device=dev)
            self.k[kind] = torch.zeros(kv, rows, d, dtype=dt, device=dev)
            self.v[kind] = torch.zeros(kv, rows, d, dtype=dt, device=dev)
            self.attn[kind] = torch.zeros(rows, H, d, dtype=dt, device=dev)


class DecoderGraphs:
    def __init__(self, model: DiffusionGemma, buckets: tuple[int, ...] = BUCKETS, capture: bool | None = None):
        """`capture`: record CUDA graphs (default: on CUDA); otherwise the pieces run eagerly."""
        self.model, self.C = model, model.config.canvas_length
        self.sizes = tuple(sorted(set(buckets)))
        self.buf = _Buffers(model, self.sizes[-1] * self.C)
        self.captured = model.device.type == "cuda" if capture is None else capture
        self.graphs: dict[int, list] = {}  # canvases -> torch.cuda.CUDAGraph per piece
        if self.captured:
            with torch.inference_mode():
                self._capture()

    @property
    def max_canvases(self) -> int:
        return self.sizes[-1]

    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.sizes if b >= n), None)

    # -- the pieces ----------------------------------------------------------------------------------------
    def _piece(self, j: int, rows: int) -> None:
        """Piece j over the first `rows` rows of the buffers: reads and writes buffers only."""
        m, b, L = self.model, self.buf, self.model.cfg.num_layers
        r = slice(0, rows)
        if j == 0:
            h = m.decoder_input(b.ids[r], b.soft[r])
            for kind, inv in m.inv_freq.items():
                cos, sin = rope_cos_sin(inv, b.positions[r], m.dtype)
                b.rope[kind][0][r].copy_(cos)
                b.rope[kind][1][r].copy_(sin)
        else:
            h = self._layer_end(j - 1, b.h[r], rows)
        if j == L:
            b.h[r].copy_(m.final_norm(h))
            return
        b.h[r].copy_(h)
        spec = m.cfg.layers[j]
        kind = _kind(spec)
        cos, sin = (t[r] for t in b.rope[kind])
        q, k, v = project(m.attention_input(j, h), m.weights.layers[j], spec, m.cfg.num_attention_heads,
                          m.cfg.rms_norm_eps, cos, sin)
        b.q[kind][:, r].copy_(q)
        b.k[kind][:, r].copy_(k)
        b.v[kind][:, r].copy_(v)

    def _layer_end(self, i: int, h: torch.Tensor, rows: int) -> torch.Tensor:
        m = self.model
        lw = m.weights.layers[i]
        a = linear(self.buf.attn[_kind(m.cfg.layers[i])][:rows].reshape(rows, -1), lw.o_proj)
        return m.after_attention(i, h, a) * lw.layer_scalar

    def _capture(self) -> None:
        """Per count, largest first: warm every piece up on a side stream (Triton compiles, cuBLAS picks its
        kernels), then capture the pieces in order into one shared memory pool."""
        pool = torch.cuda.graph_pool_handle()
        pieces = self.model.cfg.num_layers + 1
        for n in reversed(self.sizes):
            rows = n * self.C
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for j in range(pieces):
                    self._piece(j, rows)
            torch.cuda.current_stream().wait_stream(side)
            graphs = []
            for j in range(pieces):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
                    self._piece(j, rows)
                graphs.append(g)
            self.graphs[n] = graphs

    def _run_piece(self, n: int, j: int) -> None:
        if self.captured:
            self.graphs[n][j].replay()
        else:
            self._piece(j, n * self.C)

    # -- a step --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, items: list[WorkItem], on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Final-normed hidden rows [n x C, D] of n canvases (a copy: the buffers are reused)."""
        n = len(items)
        size = self.bucket_for(n)
        if size is None or not items or any(it.encode or it.ids.shape[0] != self.C for it in items):
            raise ValueError(f"the step graphs take 1..{self.max_canvases} canvases of {self.C} rows; got "
                             f"{[(it.ids.shape[0], 'encode' if it.encode else 'canvas') for it in items]}")
        b, C, m = self.buf, self.C, self.model
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
        self._run_piece(size, 0)
        for i, spec in enumerate(m.cfg.layers):
            kind = _kind(spec)
            attend(b.q[kind][:, :size * C], b.k[kind][:, :size * C], b.v[kind][:, :size * C], spec, attn_items,
                   [it.cache.layers[i] for it in items], m.cfg.sliding_window, b.attn[kind][:size * C], plans)
            self._run_piece(size, i + 1)
            if on_layer is not None:
                on_layer(i)
        return b.h[:n * C].clone()
