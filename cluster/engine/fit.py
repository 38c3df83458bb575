"""Will it fit: a rank's weights and the engine's memory budget against a device, computed from the checkpoint's
config alone (nothing loaded), so a unit can refuse to start with a verdict that says what to change.

    budget = fraction x device memory - weights - reserve
    request = KV cache at prompt + new tokens (model.cache.kv_bytes) + the canvas workspace (MemorySizes)
    canvases = budget // request        (requests of that size the engine admits at once)

`reserve` covers what the budget does not count: the CUDA context, allocator slack and a pass's activations.
Weights are the text model's (the vision tower is not loaded by the engine yet).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dgserve.model.config import ModelConfig
from dgserve.model.weights import expert_specs, global_specs, layer_specs

from .budget import MemorySizes

GB = 10**9
GiB = 1 << 30
DEFAULT_FRACTION = 0.9  # of the device's memory, as serving engines size their caches
DEFAULT_RESERVE = 2 * GiB


def weight_bytes(config: ModelConfig, dtype: torch.dtype, experts: Sequence[int] | None = None,
                 attention: bool = True) -> int:
    """Bytes of the text weights a rank holds: the attention part (embeddings, attention, dense MLP, norms,
    router) unless `attention` is False, and the routed experts `experts` (None: all)."""
    tc, size = config.text, dtype.itemsize
    total = 0
    if attention:
        specs = list(global_specs(tc).values()) + [s for i in range(tc.num_layers)
                                                   for s in layer_specs(tc, i).values()]
        total += sum(_numel(s.shape) for s in specs) * size
    held = tc.num_experts if experts is None else len(set(experts))
    for i in range(tc.num_layers):
        for s in expert_specs(tc, i).values():
            total += _numel(s.shape) // tc.num_experts * held * size
    return total


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class FitPlan:
    device_bytes: int
    weights_bytes: int
    budget_bytes: int  # what the engine may reserve for requests (<= 0: nothing fits)
    request_bytes: int  # one request of the planned size: KV cache and canvas workspace
    canvases: int  # such requests admitted at once
    needed: int  # canvases asked for

    @property
    def fits(self) -> bool:
        return self.canvases >= self.needed

    def verdict(self) -> str:
        head = (f"weights {self.weights_bytes / GB:.1f} GB, budget {max(self.budget_bytes, 0) / GB:.1f} GB of a "
                f"{self.device_bytes / GB:.1f} GB device; {self.request_bytes / 1e6:.0f} MB per request")
        if self.fits:
            return f"fits: {head}; {self.canvases} requests at once (asked {self.needed})"
        if self.budget_bytes <= 0:
            return (f"does not fit: {head}; the weights leave no room: use FP8 experts, more expert ranks "
                    "(profile packed or disaggregated), or a larger device")
        return (f"does not fit: {head}; {self.canvases} requests at once, {self.needed} asked: lower "
                f"engine.max_running to {max(self.canvases, 1)}, shorten the context, use the fused sampler "
                "or FP8 experts, or add attention ranks")


def plan_fit(config: ModelConfig, dtype: torch.dtype, device_bytes: int, *, running: int, prompt_tokens: int,
             new_tokens: int, fused: bool, device: str = "cuda", page_size: int | None = None,
             experts: Sequence[int] | None = None, fraction: float = DEFAULT_FRACTION,
             reserve: int = DEFAULT_RESERVE) -> FitPlan:
    """An attention rank's plan: `running` requests of `prompt_tokens` + `new_tokens` positions on a device of
    `device_bytes`, holding `experts` (None: all; [] with expert ranks)."""
    weights = weight_bytes(config, dtype, experts)
    budget = int(fraction * device_bytes) - weights - reserve
    sizes = MemorySizes(config, dtype, page_size or config.canvas_length, fused, device)
    request = sizes.request(prompt_tokens + new_tokens)
    return FitPlan(device_bytes, weights, budget, request, max(budget, 0) // request, running)
