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
from dgserve.model.errors import ConfigError
from dgserve.model.weights import expert_specs, global_specs, layer_specs

from .budget import MemorySizes
from .config import EngineConfig

GB = 10**9
GiB = 1 << 30
DEFAULT_FRACTION = 0.9  # of the device's memory, as serving engines size their caches
DEFAULT_RESERVE = 2 * GiB
CPU_BUDGET = 4 * GiB  # the budget on CPU when none is set


def derived_budget(free: int, total: int, fraction: float, reserve: int = DEFAULT_RESERVE) -> int:
    """The engine's budget on a device whose weights are loaded: `fraction` of its memory, less what is in use
    already (weights, CUDA context, other processes) and the reserve; never negative."""
    return max(0, int(fraction * total) - (total - free) - reserve)


def resolve_budget(memory_budget_bytes: int | None, fraction: float, device: torch.device) -> int:
    """The configured budget, or one derived from the device's free memory now (CUDA), or CPU_BUDGET."""
    if memory_budget_bytes is not None:
        return memory_budget_bytes
    if device.type == "cuda":
        torch.cuda.empty_cache()  # memory the allocator caches but no tensor holds counts as free
        free, total = torch.cuda.mem_get_info(device)
        return derived_budget(free, total, fraction)
    return CPU_BUDGET


def weight_bytes(config: ModelConfig, dtype: torch.dtype, experts: Sequence[int] | None = None,
                 attention: bool = True, experts_dtype: str = "auto") -> int:
    """Bytes of the text weights a rank holds: the attention part (embeddings, attention, dense MLP, norms,
    router) unless `attention` is False, and the routed experts `experts` (None: all), in `dtype` or, with
    experts_dtype "fp8", one byte a weight plus a float32 scale per output channel (ExpertWeights.nbytes)."""
    tc, size = config.text, dtype.itemsize
    total = 0
    if attention:
        specs = list(global_specs(tc).values()) + [s for i in range(tc.num_layers)
                                                   for s in layer_specs(tc, i).values()]
        total += sum(numel(s.shape) for s in specs) * size
    held = tc.num_experts if experts is None else len(set(experts))
    for i in range(tc.num_layers):
        for s in expert_specs(tc, i).values():
            per_expert = numel(s.shape) // tc.num_experts
            if experts_dtype == "fp8":  # [out, in] a expert: out channels of scales
                total += held * (per_expert + s.shape[1] * 4)
            else:
                total += held * per_expert * size
    return total


def numel(shape: tuple[int, ...]) -> int:
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
             reserve: int = DEFAULT_RESERVE, experts_dtype: str = "auto") -> FitPlan:
    """An attention rank's plan: `running` requests of `prompt_tokens` + `new_tokens` positions on a device of
    `device_bytes`, holding `experts` (None: all; [] with expert ranks) in `experts_dtype`."""
    weights = weight_bytes(config, dtype, experts, experts_dtype=experts_dtype)
    budget = int(fraction * device_bytes) - weights - reserve
    sizes = MemorySizes(config, dtype, page_size or config.canvas_length, fused, device)
    request = sizes.request(prompt_tokens + new_tokens)
    return FitPlan(device_bytes, weights, budget, request, max(budget, 0) // request, running)


PLANNED_PROMPT, PLANNED_NEW = 4096, 256  # the request size the start-up verdict is phrased in


def check_device(config: ModelConfig, dtype: torch.dtype, device_bytes: int, engine: EngineConfig, *,
                 fused: bool, experts: Sequence[int] | None = None, experts_dtype: str = "auto") -> FitPlan:
    """Before a rank loads anything: its plan for `engine.max_running` requests of 4,096 + 256 positions. Raises a
    ConfigError with the verdict when the weights leave no budget (the rank could serve nothing); otherwise the
    caller logs and reports the verdict (fewer requests than max_running only means a fuller queue)."""
    plan = plan_fit(config, dtype, device_bytes, running=engine.max_running, prompt_tokens=PLANNED_PROMPT,
                    new_tokens=PLANNED_NEW, fused=fused, page_size=engine.page_size, experts=experts,
                    fraction=engine.memory_fraction, experts_dtype=experts_dtype)
    if plan.budget_bytes <= 0 or plan.canvases < 1:
        raise ConfigError("device", f"{device_bytes / GB:.1f} GB", plan.verdict(), "start-up check")
    return plan

