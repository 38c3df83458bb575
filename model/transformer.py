"""The DiffusionGemma text stack: one set of layers run two ways (MODEL_SPEC 3.2-3.7).

`forward` runs one packed pass over any mix of work items (encoder chunks that write KV, canvases that read it)
so an engine can batch them; `encode` and `denoise` are the single-item forms. Experts are reached only through
the `ExpertBackend` given at construction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .attention import AttnItem, attention
from .cache import KVCache
from .config import ModelConfig
from .layers import RowLayout, gated_mlp, linear, rms_norm, rope_cos_sin, rope_inv_freq
from .media import chunk_bounds
from .moe import ExpertBackend, route
from .vision import VisionTower
from .weights import LayerWeights, TextWeights


@dataclass(frozen=True, slots=True)
class WorkItem:
    """A span of rows in a packed pass: an encoder chunk (ids, and the image rows that replace its soft tokens) or a
    canvas (ids + optional soft embedding)."""

    cache: KVCache
    ids: torch.Tensor  # [T] token ids
    encode: bool
    soft_CD: torch.Tensor | None = None  # self-conditioning soft embedding, canvases only
    media: tuple[tuple[int, int], ...] = ()  # [a, b) rows of the item holding one image's (or frame's) soft tokens
    media_MD: torch.Tensor | None = None  # the vision tower's rows for them, in order [sum(b - a), D]


def media_rows(spans: list[tuple[int, int]], soft_rows: list[torch.Tensor], a: int, b: int
               ) -> tuple[tuple[tuple[int, int], ...], torch.Tensor | None]:
    """The image runs of prompt positions [a, b) relative to a, and their tower rows (runs lie whole in a chunk)."""
    inside = [(k, s, e) for k, (s, e) in enumerate(spans) if a <= s and e <= b]
    if not inside:
        return (), None
    rows = [soft_rows[k] for k, _, _ in inside]
    return tuple((s - a, e - a) for _, s, e in inside), rows[0] if len(rows) == 1 else torch.cat(rows)


class DiffusionGemma:
    def __init__(self, config: ModelConfig, weights: TextWeights, experts: ExpertBackend,
                 vision: VisionTower | None = None):
        self.config, self.cfg, self.weights, self.experts = config, config.text, weights, experts
        self.vision = vision  # the image encoder (model.vision), when loaded
        self.dtype = weights.dtype
        self.device = weights.embed.device
        # Batched passes give every item bitwise the rows it would get alone where the kernels allow it: CPU
        # float32 (see RowLayout). On GPU, results are compared by distribution instead.
        self.exact_batching = self.device.type == "cpu" and self.dtype == torch.float32
        # Attention of a pass in one kernel call per batch of items (model.attention_batch); a call per item where
        # batching must be exact.
        self.batched_attention = not self.exact_batching
        # The reference stores sqrt(D) as a float32 tensor and casts it to the weight dtype (53.0 in bf16).
        self.embed_scale = torch.tensor(self.cfg.embed_scale, dtype=torch.float32).to(self.dtype)
        # on the device: a pass never copies from the host (a blocking copy would wait for the GPU)
        self.inv_freq = {kind: rope_inv_freq(spec, self._head_dim(kind)).to(self.device)
                         for kind, spec in self.cfg.rope.items()}

    def _head_dim(self, kind: str) -> int:
        return next((s.head_dim for s in self.cfg.layers if s.kind == kind), self.cfg.layers[0].head_dim)

    def new_cache(self, page_size: int | None = None) -> KVCache:
        if page_size is None:
            return KVCache(self.cfg, self.dtype, self.device)
        return KVCache(self.cfg, self.dtype, self.device, page_size)

    # -- embeddings and head ------------------------------------------------------------------------------
    def embed(self, ids_T: torch.Tensor) -> torch.Tensor:
        return self.weights.embed[ids_T] * self.embed_scale

    def soft_embedding(self, probs_CV: torch.Tensor) -> torch.Tensor:
        """Self-conditioning input from the previous step's softmax: (p @ E) * scale  [C, D]."""
        return torch.matmul(probs_CV.to(self.dtype), self.weights.embed) * self.embed_scale

    def soft_from_mean(self, mean_CD: torch.Tensor) -> torch.Tensor:
        """The self-conditioning input from the fused vocabulary pass's softmax(Z) @ E (float32) [C, D]: scaled
        as `soft_embedding` scales p @ E."""
        return mean_CD.to(self.dtype) * self.embed_scale

    def decoder_input(self, ids_C: torch.Tensor, soft_CD: torch.Tensor | None) -> torch.Tensor:
        w, eps = self.weights, self.cfg.rms_norm_eps
        e = self.embed(ids_C)
        if soft_CD is not None:
            # With no previous step the soft input is zero and its MLP adds exactly zero: skip it.
            e = e + gated_mlp(rms_norm(soft_CD, w.sc_pre_norm, eps), w.sc_gate, w.sc_up, w.sc_down)
        return rms_norm(e, None, eps)

    def _encoder_input(self, it: WorkItem) -> torch.Tensor:
        """Scaled token embeddings, with each image's soft-token rows replaced by the tower's (MODEL_SPEC 3.2)."""
        h = self.embed(it.ids)
        if it.media:
            rows = torch.cat([torch.arange(a, b, device=self.device) for a, b in it.media])
            if it.media_MD is None or it.media_MD.shape[0] != rows.shape[0]:
                raise ValueError(f"work item has {rows.shape[0]} image rows but "
                                 f"{None if it.media_MD is None else it.media_MD.shape[0]} tower rows")
            h[rows] = it.media_MD.to(device=self.device, dtype=self.dtype)
        return h

    def logits(self, hidden_TD: torch.Tensor, layout: RowLayout | None = None) -> torch.Tensor:
        """Tied LM head with the float32 softcap: [T, V] float32."""
        cap = self.cfg.final_logit_softcapping
        logits = linear(hidden_TD, self.weights.embed, layout).float()
        return torch.tanh(logits / cap) * cap

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, self.weights.final_norm, self.cfg.rms_norm_eps)

    # -- the packed pass -----------------------------------------------------------------------------------
    def forward(self, items: list[WorkItem], on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Run one pass over all items; returns final-normed hidden states [N, D] in item order.

        Items run in list order within each layer, so an encode item (a committed block) followed by a canvas of
        the same request writes its KV before the canvas reads it: both fit in one pass. `on_layer(i)` is called
        after each layer (an engine's progress beat: its watchdog sees a long pass advancing).
        """
        h_parts, pos_parts, attn_items, bounds = [], [], [], [0]
        next_pos: dict[int, int] = {}
        for it in items:
            n = it.ids.shape[0]
            h_parts.append(self._encoder_input(it) if it.encode else self.decoder_input(it.ids, it.soft_CD))
            start = next_pos.get(id(it.cache), it.cache.length)
            if it.encode:
                next_pos[id(it.cache)] = start + n
            pos_parts.append(torch.arange(start, start + n, device=self.device))
            blocks = tuple((start + a, start + b) for a, b in it.media) if self.cfg.vision_bidirectional else ()
            attn_items.append(AttnItem(bounds[-1], bounds[-1] + n, start, it.encode, blocks))
            bounds.append(bounds[-1] + n)
        h = h_parts[0] if len(h_parts) == 1 else torch.cat(h_parts)
        positions = pos_parts[0] if len(pos_parts) == 1 else torch.cat(pos_parts)
        layout = RowLayout(tuple(bounds), exact=self.exact_batching) if len(items) > 1 else None
        rope = {kind: rope_cos_sin(inv, positions, self.dtype) for kind, inv in self.inv_freq.items()}
        plans = {} if self.batched_attention else None
        for i, lw in enumerate(self.weights.layers):
            h = self._layer(i, lw, h, rope, items, attn_items, layout, plans)
            if on_layer is not None:
                on_layer(i)
        for it in items:
            if it.encode:
                it.cache.length += it.ids.shape[0]
        return self.final_norm(h)

    def _layer(self, i: int, lw: LayerWeights, h: torch.Tensor, rope: dict, items: list[WorkItem],
               attn_items: list[AttnItem], layout: RowLayout | None, plans: dict | None) -> torch.Tensor:
        cfg, spec = self.cfg, self.cfg.layers[i]
        cos, sin = rope[spec.kind]
        a = attention(self.attention_input(i, h), lw, spec, cfg.num_attention_heads, cfg.rms_norm_eps, cos, sin,
                      attn_items, [it.cache.layers[i] for it in items], cfg.sliding_window, layout, plans)
        return self._scale_rows(self.after_attention(i, h, a, layout), lw, attn_items)

    def attention_input(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, self.weights.layers[i].input_layernorm, self.cfg.rms_norm_eps)

    def after_attention(self, i: int, h: torch.Tensor, a_ND: torch.Tensor,
                        layout: RowLayout | None = None) -> torch.Tensor:
        """Layer i after its attention block `a_ND`: the residual, the dense MLP and the experts (before the
        layer scalar)."""
        cfg, eps, lw = self.cfg, self.cfg.rms_norm_eps, self.weights.layers[i]
        h = h + rms_norm(a_ND, lw.post_attention_layernorm, eps)
        r = h
        dense = rms_norm(gated_mlp(rms_norm(r, lw.pre_feedforward_layernorm, eps), lw.mlp_gate, lw.mlp_up,
                                   lw.mlp_down, layout), lw.post_feedforward_layernorm_1, eps)
        weights_TK, ids_TK = route(r, lw.router_proj, lw.router_scale, lw.router_per_expert_scale,
                                   cfg.top_k_experts, eps, layout)
        moe = self.experts(i, rms_norm(r, lw.pre_feedforward_layernorm_2, eps), ids_TK, weights_TK, layout)
        return r + rms_norm(dense + rms_norm(moe, lw.post_feedforward_layernorm_2, eps),
                            lw.post_feedforward_layernorm, eps)

    @staticmethod
    def _scale_rows(h: torch.Tensor, lw: LayerWeights, attn_items: list[AttnItem]) -> torch.Tensor:
        modes = {a.encode for a in attn_items}
        if len(modes) == 1:
            return h * (lw.encoder_layer_scalar if attn_items[0].encode else lw.layer_scalar)
        for a in attn_items:
            h[a.start:a.stop] *= lw.encoder_layer_scalar if a.encode else lw.layer_scalar
        return h

    # -- single-item forms ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, cache: KVCache, ids_T: torch.Tensor, chunk: int = 4096,
               media: list[tuple[int, int]] | None = None, soft_rows: list[torch.Tensor] | None = None
               ) -> torch.Tensor:
        """Causal pass over a prompt or committed block; writes KV. Returns final-normed hidden [T, D].
        `media`: [start, stop) of each image's soft tokens in `ids_T`, `soft_rows` the tower's rows for each; a
        chunk never ends inside one."""
        spans = media or []
        outs = []
        for a, b in chunk_bounds(ids_T.shape[0], chunk, spans):
            rows, rows_MD = media_rows(spans, soft_rows or [], a, b)
            outs.append(self.forward([WorkItem(cache, ids_T[a:b], encode=True, media=rows, media_MD=rows_MD)]))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @torch.inference_mode()
    def denoise(self, cache: KVCache, canvas_C: torch.Tensor, soft_CD: torch.Tensor | None) -> torch.Tensor:
        """Bidirectional pass over a canvas reading the cache: softcapped logits [C, V] float32."""
        return self.logits(self.forward([WorkItem(cache, canvas_C, encode=False, soft_CD=soft_CD)]))
