"""Typed, validated model config read from a checkpoint's `config.json` and `generation_config.json`.

Both the shipped checkpoint's form (`global_head_dim`, `num_global_key_value_heads`) and the form written by
transformers' `save_pretrained` (`per_layer_config`) are accepted; they resolve to the same per-layer specs.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError
from .settings import SamplerSettings
from .validate import is_int

log = logging.getLogger(__name__)

LayerKind = Literal["sliding", "full"]
_LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "full"}
_SUPPORTED_ROPE = ("default", "proportional")


@dataclass(frozen=True, slots=True)
class RopeSpec:
    rope_type: str
    theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclass(frozen=True, slots=True)
class LayerSpec:
    kind: LayerKind
    head_dim: int
    num_kv_heads: int

    @property
    def is_sliding(self) -> bool:
        return self.kind == "sliding"


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    top_k_experts: int
    num_attention_heads: int
    layers: tuple[LayerSpec, ...]
    rope: dict[str, RopeSpec]
    sliding_window: int
    max_position_embeddings: int
    final_logit_softcapping: float
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    vision_bidirectional: bool = True

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                  "num_experts", "top_k_experts", "num_attention_heads", "sliding_window",
                  "max_position_embeddings")
        if self.top_k_experts > self.num_experts:
            raise ConfigError("top_k_experts", self.top_k_experts, f"1..num_experts ({self.num_experts})")
        if not self.layers:
            raise ConfigError("num_hidden_layers", 0, ">= 1")
        for i, spec in enumerate(self.layers):
            if spec.head_dim <= 0 or spec.head_dim % 2:
                raise ConfigError(f"layers[{i}].head_dim", spec.head_dim, "a positive even integer")
            if spec.num_kv_heads <= 0 or self.num_attention_heads % spec.num_kv_heads:
                raise ConfigError(f"layers[{i}].num_key_value_heads", spec.num_kv_heads,
                                  f"a divisor of num_attention_heads ({self.num_attention_heads})")
        if not self.final_logit_softcapping > 0:
            raise ConfigError("final_logit_softcapping", self.final_logit_softcapping, "a float > 0")
        if not 0 < self.rms_norm_eps < 1:
            raise ConfigError("rms_norm_eps", self.rms_norm_eps, "0 < eps < 1")


@dataclass(frozen=True)
class VisionConfig:
    """The Gemma 4 vision tower (MODEL_SPEC 3.8): patches -> bidirectional layers -> pooled soft tokens."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10 * 1024
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0
    standardize: bool = False
    default_output_length: int = 280

    def __post_init__(self) -> None:
        _positive(self, "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "patch_size", "pooling_kernel_size", "position_embedding_size")
        if self.head_dim % 4:
            raise ConfigError("vision_config.head_dim", self.head_dim, "a multiple of 4 (2-D RoPE rotates x and y)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("vision_config.num_key_value_heads", self.num_key_value_heads,
                              f"a divisor of num_attention_heads ({self.num_attention_heads})")

    @property
    def patch_pixels(self) -> int:
        return 3 * self.patch_size**2


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    canvas_length: int
    image_token_id: int | None = None
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    video_token_id: int | None = None
    vision: VisionConfig | None = None

    def __post_init__(self) -> None:
        _positive(self, "canvas_length")

    @property
    def media_token_ids(self) -> frozenset[int]:
        """The soft-token ids a vision block fills (images and video frames)."""
        return frozenset(t for t in (self.image_token_id, self.video_token_id) if t is not None)


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not is_int(value) or value <= 0:
            raise ConfigError(name, value, "a positive integer")


def _get(d: dict, key: str, default: Any = None, *, required: bool = False, source: str = "config.json") -> Any:
    if key in d and d[key] is not None:
        return d[key]
    if required:
        raise ConfigError(key, None, "a value (field is missing)", source)
    return default


def _layer_specs(tc: dict) -> tuple[LayerSpec, ...]:
    n = _get(tc, "num_hidden_layers", required=True, source="config.json text_config")
    if not isinstance(n, int) or n <= 0:
        raise ConfigError("text_config.num_hidden_layers", n, "a positive integer", "config.json")
    types = _get(tc, "layer_types")
    if types is None:  # transformers' default pattern: 5 sliding then 1 full
        types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
    if len(types) != n:
        raise ConfigError("text_config.layer_types", f"{len(types)} entries", f"{n} (num_hidden_layers)",
                          "config.json")
    bad = [t for t in types if t not in _LAYER_TYPES]
    if bad:
        raise ConfigError("text_config.layer_types", bad[0], "sliding_attention | full_attention", "config.json")
    types = list(types)
    if types[-1] != "full_attention":
        # The reference forces the last layer to full attention; do the same so results match.
        log.warning("config.json: last layer is %s; forcing full_attention as the reference does", types[-1])
        types[-1] = "full_attention"
    head_dim = _get(tc, "head_dim", required=True, source="config.json text_config")
    kv = _get(tc, "num_key_value_heads", required=True, source="config.json text_config")
    per_layer = _get(tc, "per_layer_config")
    if per_layer is None:
        full_override = {"head_dim": _get(tc, "global_head_dim", 512)}
        if tc.get("num_global_key_value_heads") is not None:
            full_override["num_key_value_heads"] = tc["num_global_key_value_heads"]
        per_layer = {str(i): full_override for i, t in enumerate(types) if t == "full_attention"}
    specs = []
    for i, t in enumerate(types):
        over = per_layer.get(str(i), per_layer.get(i, {})) or {}
        specs.append(LayerSpec(kind=_LAYER_TYPES[t], head_dim=int(over.get("head_dim", head_dim)),
                               num_kv_heads=int(over.get("num_key_value_heads", kv))))
    return tuple(specs)


def _rope_specs(tc: dict) -> dict[str, RopeSpec]:
    params = _get(tc, "rope_parameters") or {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }
    out = {}
    for layer_type, kind in _LAYER_TYPES.items():
        p = params.get(layer_type)
        if p is None:
            raise ConfigError(f"text_config.rope_parameters.{layer_type}", None, "a rope spec", "config.json")
        rope_type = p.get("rope_type", "default")
        if rope_type not in _SUPPORTED_ROPE:
            raise ConfigError(f"text_config.rope_parameters.{layer_type}.rope_type", rope_type,
                              " | ".join(_SUPPORTED_ROPE), "config.json")
        prf = float(p.get("partial_rotary_factor", 1.0))
        if rope_type == "default" and prf != 1.0:
            raise ConfigError(f"text_config.rope_parameters.{layer_type}.partial_rotary_factor", prf,
                              "1.0 for rope_type default", "config.json")
        if not 0 < prf <= 1:
            raise ConfigError(f"text_config.rope_parameters.{layer_type}.partial_rotary_factor", prf,
                              "0 < factor <= 1", "config.json")
        theta = p.get("rope_theta")
        if not isinstance(theta, (int, float)) or theta <= 0:
            raise ConfigError(f"text_config.rope_parameters.{layer_type}.rope_theta", theta, "> 0", "config.json")
        out[kind] = RopeSpec(rope_type, float(theta), prf, float(p.get("factor", 1.0)))
    return out


def text_config_from_dict(tc: dict) -> TextConfig:
    src = "config.json text_config"
    act = tc.get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ConfigError("text_config.hidden_activation", act, "gelu_pytorch_tanh", "config.json")
    if tc.get("attention_bias"):
        raise ConfigError("text_config.attention_bias", tc["attention_bias"], "false", "config.json")
    bidir = tc.get("use_bidirectional_attention")
    if bidir not in (None, "vision"):
        raise ConfigError("text_config.use_bidirectional_attention", bidir, "vision | null", "config.json")
    return TextConfig(
        vocab_size=_get(tc, "vocab_size", required=True, source=src),
        hidden_size=_get(tc, "hidden_size", required=True, source=src),
        intermediate_size=_get(tc, "intermediate_size", required=True, source=src),
        moe_intermediate_size=_get(tc, "moe_intermediate_size", required=True, source=src),
        num_experts=_get(tc, "num_experts", required=True, source=src),
        top_k_experts=_get(tc, "top_k_experts", required=True, source=src),
        num_attention_heads=_get(tc, "num_attention_heads", required=True, source=src),
        layers=_layer_specs(tc),
        rope=_rope_specs(tc),
        sliding_window=_get(tc, "sliding_window", 512),
        max_position_embeddings=_get(tc, "max_position_embeddings", 131_072),
        final_logit_softcapping=_get(tc, "final_logit_softcapping", 30.0),
        rms_norm_eps=float(_get(tc, "rms_norm_eps", 1e-6)),
        pad_token_id=tc.get("pad_token_id", 0),
        bos_token_id=tc.get("bos_token_id", 2),
        vision_bidirectional=bidir == "vision",
    )


def vision_config_from_dict(vc: dict) -> VisionConfig:
    src = "config.json vision_config"
    if vc.get("model_type") not in (None, "gemma4_vision"):
        raise ConfigError("vision_config.model_type", vc.get("model_type"), "gemma4_vision", "config.json")
    if vc.get("use_clipped_linears"):
        raise ConfigError("vision_config.use_clipped_linears", True, "false", "config.json")
    act = vc.get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ConfigError("vision_config.hidden_activation", act, "gelu_pytorch_tanh", "config.json")
    rope = vc.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") not in ("axial", "default"):  # transformers reads "default" as axial
        raise ConfigError("vision_config.rope_parameters.rope_type", rope.get("rope_type"), "axial", "config.json")
    heads = _get(vc, "num_attention_heads", 12)
    return VisionConfig(
        hidden_size=_get(vc, "hidden_size", required=True, source=src),
        intermediate_size=_get(vc, "intermediate_size", required=True, source=src),
        num_layers=_get(vc, "num_hidden_layers", required=True, source=src),
        num_attention_heads=heads,
        num_key_value_heads=_get(vc, "num_key_value_heads", heads),
        head_dim=_get(vc, "head_dim", required=True, source=src),
        patch_size=_get(vc, "patch_size", 16),
        pooling_kernel_size=_get(vc, "pooling_kernel_size", 3),
        position_embedding_size=_get(vc, "position_embedding_size", 10 * 1024),
        rms_norm_eps=float(_get(vc, "rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", 100.0)),
        standardize=bool(vc.get("standardize", False)),
        default_output_length=_get(vc, "default_output_length", 280),
    )


def model_config_from_dict(raw: dict) -> ModelConfig:
    if raw.get("model_type") not in (None, "diffusion_gemma"):
        raise ConfigError("model_type", raw.get("model_type"), "diffusion_gemma", "config.json")
    tc = raw.get("text_config")
    if not isinstance(tc, dict):
        raise ConfigError("text_config", tc, "an object with the text model's fields", "config.json")
    if raw.get("tie_word_embeddings", True) is False:
        raise ConfigError("tie_word_embeddings", False, "true (the LM head is the embedding)", "config.json")
    return ModelConfig(
        text=text_config_from_dict(tc),
        canvas_length=_get(raw, "canvas_length", 256),
        image_token_id=raw.get("image_token_id"),
        boi_token_id=raw.get("boi_token_id"),
        eoi_token_id=raw.get("eoi_token_id"),
        video_token_id=raw.get("video_token_id"),
        vision=vision_config_from_dict(raw["vision_config"]) if isinstance(raw.get("vision_config"), dict) else None,
    )


def generation_defaults_from_dict(g: dict) -> SamplerSettings:
    """The checkpoint's sampler defaults; null or missing fields take transformers' defaults."""
    src = "generation_config.json"
    sampler = g.get("sampler_config") or {}
    if sampler and sampler.get("_cls_name", "EntropyBoundSamplerConfig") != "EntropyBoundSamplerConfig":
        raise ConfigError("sampler_config._cls_name", sampler.get("_cls_name"), "EntropyBoundSamplerConfig", src)
    eos = g.get("eos_token_id")
    eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    fields_ = {k: g.get(k) for k in ("max_new_tokens", "max_denoising_steps", "t_min", "t_max",
                                     "stability_threshold", "confidence_threshold", "pad_token_id")}
    fields_["entropy_bound"] = sampler.get("entropy_bound")
    try:
        return SamplerSettings.from_defaults(SamplerSettings(), eos_token_ids=eos_ids, **fields_)
    except ConfigError as e:
        raise ConfigError(e.field, e.value, e.allowed, src) from e


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(path.name, f"line {e.lineno}", "valid JSON", str(path)) from e
    if not isinstance(data, dict):
        raise ConfigError(path.name, type(data).__name__, "a JSON object", str(path))
    return data


def load_model_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError("config.json", str(path), "an existing file in the checkpoint folder", str(folder))
    return model_config_from_dict(_read_json(path))


def load_generation_defaults(folder: str | Path) -> SamplerSettings:
    """Missing file or null fields take transformers' defaults, exactly as the reference's `generate`."""
    path = Path(folder) / "generation_config.json"
    return generation_defaults_from_dict(_read_json(path)) if path.is_file() else SamplerSettings()


def num_blocks(max_new_tokens: int, canvas_length: int) -> int:
    return math.ceil(max_new_tokens / canvas_length)
