"""A request's sampler settings: typed, validated, and free of torch (the gateway and the Serve replicas that only
relay requests import this without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .errors import ConfigError
from .validate import is_int, require

MAX_DENOISING_STEPS = 1024
MAX_SEED = (1 << 63) - 1
# The knobs a request may set (eos and pad ids come from the checkpoint).
KNOBS = ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
         "confidence_threshold")


@dataclass(frozen=True)
class SamplerSettings:
    """One request's sampler settings. A checkpoint's generation_config.json gives the defaults
    (config.load_generation_defaults, with transformers' values for unset fields); a request overrides them."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        def need(name: str, ok: bool, allowed: str) -> None:
            require(ok, name, getattr(self, name), allowed, "sampler")

        need("max_new_tokens", is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1")
        need("max_denoising_steps", is_int(self.max_denoising_steps) and
             1 <= self.max_denoising_steps <= MAX_DENOISING_STEPS, f"an integer in 1..{MAX_DENOISING_STEPS}")
        need("entropy_bound", isinstance(self.entropy_bound, float) and self.entropy_bound > 0, "a float > 0")
        need("t_min", isinstance(self.t_min, float) and self.t_min >= 0, "a float >= 0")
        need("t_max", isinstance(self.t_max, float) and self.t_max > self.t_min, f"a float > t_min ({self.t_min})")
        need("stability_threshold", is_int(self.stability_threshold) and self.stability_threshold >= 0,
             "an integer >= 0")
        need("confidence_threshold", isinstance(self.confidence_threshold, float) and self.confidence_threshold > 0,
             "a float > 0")
        need("eos_token_ids", isinstance(self.eos_token_ids, tuple) and all(map(is_int, self.eos_token_ids)),
             "a tuple of token ids")
        need("pad_token_id", self.pad_token_id is None or is_int(self.pad_token_id), "null or a token id")

    @classmethod
    def from_defaults(cls, defaults: SamplerSettings, **overrides) -> SamplerSettings:
        """`defaults` (the checkpoint's), with every override that is not None applied (and validated)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(unknown[0], overrides[unknown[0]], f"one of {sorted(known)}", "sampler")
        for k in ("entropy_bound", "t_min", "t_max", "confidence_threshold"):
            if is_int(overrides.get(k)):
                overrides[k] = float(overrides[k])
        if overrides.get("eos_token_ids") is not None:
            overrides["eos_token_ids"] = tuple(overrides["eos_token_ids"])
        return replace(defaults, **{k: v for k, v in overrides.items() if v is not None})

    def temperatures(self):
        """Float32 temperature for remaining-step n = 1..N at index n (computed with the reference's ops): a
        torch.Tensor [N + 1]."""
        import torch

        n = torch.arange(0, self.max_denoising_steps + 1, dtype=torch.int32)
        return self.t_min + ((self.t_max - self.t_min) * (n / self.max_denoising_steps))
