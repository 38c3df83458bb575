"""The physical floor of one denoise step (gpu_bench.py): the larger of the bytes it must read over the HBM
bandwidth and the FLOPs it must do over the tensor cores' peak (after ../shared/reference/roofline.py).

Bytes: every weight (at batch 1 a canvas's 256 x 8 expert picks touch nearly all 128 experts of a layer) and each
canvas's KV rows. FLOPs: per canvas row, 2 x the active matmul parameters (attention projections, dense MLP,
router, top-k experts; the LM head and the self-conditioning product p @ E, each V x D), plus attention
(4 x H x d per key: QK and PV) over the keys a canvas row reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

H200_BANDWIDTH = 4.8e12  # bytes/s, HBM3e
H200_BF16_PEAK = 989e12  # FLOP/s, dense bf16 tensor cores (as the H100 SXM)


def active_params_per_row(cfg) -> int:
    from dgserve.cluster.engine.fit import numel
    from dgserve.model.weights import expert_specs, layer_specs

    t = cfg.text
    total = 2 * t.vocab_size * t.hidden_size  # LM head + self-conditioning input
    for i in range(t.num_layers):
        total += sum(numel(s.shape) for s in layer_specs(t, i).values() if len(s.shape) == 2)
        total += sum(numel(s.shape) for s in expert_specs(t, i).values()) * t.top_k_experts // t.num_experts
    return total


def _keys(cfg, spec, context: int) -> int:
    cached = min(context, cfg.text.sliding_window - 1) if spec.is_sliding else context
    return cached + cfg.canvas_length


@dataclass(frozen=True)
class StepFloor:
    bytes_ms: float
    flops_ms: float

    @property
    def ms(self) -> float:
        return max(self.bytes_ms, self.flops_ms)

    @property
    def bound(self) -> str:
        return "memory" if self.bytes_ms >= self.flops_ms else "compute"


def step_floor(cfg, dtype: torch.dtype, canvases: int, context: int, bandwidth: float = H200_BANDWIDTH,
               peak: float = H200_BF16_PEAK, experts_dtype: str = "auto") -> StepFloor:
    """FP8 experts read half the expert bytes; their FLOPs are counted at the bf16 peak (FP8 tensor cores are
    twice as fast, so the compute floor is conservative there)."""
    from dgserve.cluster.engine.fit import weight_bytes

    t, rows = cfg.text, canvases * cfg.canvas_length
    size = torch.empty((), dtype=dtype).element_size()
    kv = sum(2 * _keys(cfg, s, context) * s.num_kv_heads * s.head_dim * size for s in t.layers) * canvases
    attn = sum(4 * t.num_attention_heads * s.head_dim * _keys(cfg, s, context) for s in t.layers) * rows
    flops = 2 * rows * active_params_per_row(cfg) + attn
    weights = weight_bytes(cfg, dtype, experts_dtype=experts_dtype)
    return StepFloor(1000 * (weights + kv) / bandwidth, 1000 * flops / peak)
