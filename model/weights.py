"""Weight containers and the one place where checkpoint tensor names are mapped (the state-dict adapter).

The checkpoint keeps every text weight under `model.decoder.*` (the encoder shares them); the only encoder-text
tensors are the `layer_scalar` duplicates under `model.encoder.language_model.layers.{L}`, which the encoder
pass uses (MODEL_SPEC 8.4). Routed experts are not part of `LayerWeights`: they live behind the expert interface
(`moe.ExpertBackend`) so they can be held by another process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import TextConfig

DECODER = "model.decoder"
ENCODER_TEXT = "model.encoder.language_model"


@dataclass
class LayerWeights:
    q_proj: torch.Tensor  # [H*d, D]
    k_proj: torch.Tensor  # [Kv*d, D]
    v_proj: torch.Tensor | None  # [Kv*d, D]; None on full layers (V is the raw k projection)
    o_proj: torch.Tensor  # [D, H*d]
    q_norm: torch.Tensor  # [d]
    k_norm: torch.Tensor  # [d]
    input_layernorm: torch.Tensor
    post_attention_layernorm: torch.Tensor
    pre_feedforward_layernorm: torch.Tensor
    post_feedforward_layernorm: torch.Tensor
    post_feedforward_layernorm_1: torch.Tensor
    post_feedforward_layernorm_2: torch.Tensor
    pre_feedforward_layernorm_2: torch.Tensor
    mlp_gate: torch.Tensor  # [F, D]
    mlp_up: torch.Tensor  # [F, D]
    mlp_down: torch.Tensor  # [D, F]
    router_proj: torch.Tensor  # [E, D]
    router_scale: torch.Tensor  # [D]
    router_per_expert_scale: torch.Tensor  # [E]
    layer_scalar: torch.Tensor  # [1], decoder pass
    encoder_layer_scalar: torch.Tensor  # [1], encoder pass


@dataclass
class TextWeights:
    embed: torch.Tensor  # [V, D], tied with the LM head
    final_norm: torch.Tensor  # [D]
    sc_pre_norm: torch.Tensor  # [D]
    sc_gate: torch.Tensor  # [F, D]
    sc_up: torch.Tensor  # [F, D]
    sc_down: torch.Tensor  # [D, F]
    layers: list[LayerWeights]

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype



@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str  # checkpoint name
    shape: tuple[int, ...]
    fallbacks: tuple[str, ...] = ()  # other names the same tensor may be stored under


def _alias(name: str) -> tuple[str, ...]:
    return (name.replace(DECODER, ENCODER_TEXT, 1),) if name.startswith(DECODER) else ()


def _spec(name: str, shape: tuple[int, ...], *extra: str) -> TensorSpec:
    return TensorSpec(name, shape, _alias(name) + extra)


def global_specs(cfg: TextConfig) -> dict[str, TensorSpec]:
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    sc = f"{DECODER}.self_conditioning"
    return {
        "embed": _spec(f"{DECODER}.embed_tokens.weight", (V, D), "lm_head.weight"),
        "final_norm": _spec(f"{DECODER}.norm.weight", (D,)),
        "sc_pre_norm": _spec(f"{sc}.pre_norm.weight", (D,)),
        "sc_gate": _spec(f"{sc}.gate_proj.weight", (F, D)),
        "sc_up": _spec(f"{sc}.up_proj.weight", (F, D)),
        "sc_down": _spec(f"{sc}.down_proj.weight", (D, F)),
    }


def layer_specs(cfg: TextConfig, i: int) -> dict[str, TensorSpec]:
    spec = cfg.layers[i]
    D, F, E, H, d, kv = (cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_attention_heads,
                         spec.head_dim, spec.num_kv_heads)
    p = f"{DECODER}.layers.{i}"
    out = {
        "q_proj": _spec(f"{p}.self_attn.q_proj.weight", (H * d, D)),
        "k_proj": _spec(f"{p}.self_attn.k_proj.weight", (kv * d, D)),
        "o_proj": _spec(f"{p}.self_attn.o_proj.weight", (D, H * d)),
        "q_norm": _spec(f"{p}.self_attn.q_norm.weight", (d,)),
        "k_norm": _spec(f"{p}.self_attn.k_norm.weight", (d,)),
        "mlp_gate": _spec(f"{p}.mlp.gate_proj.weight", (F, D)),
        "mlp_up": _spec(f"{p}.mlp.up_proj.weight", (F, D)),
        "mlp_down": _spec(f"{p}.mlp.down_proj.weight", (D, F)),
        "router_proj": _spec(f"{p}.router.proj.weight", (E, D)),
        "router_scale": _spec(f"{p}.router.scale", (D,)),
        "router_per_expert_scale": _spec(f"{p}.router.per_expert_scale", (E,)),
        "layer_scalar": _spec(f"{p}.layer_scalar", (1,)),
        "encoder_layer_scalar": TensorSpec(f"{ENCODER_TEXT}.layers.{i}.layer_scalar", (1,), (f"{p}.layer_scalar",)),
    }
    if spec.is_sliding:
        out["v_proj"] = _spec(f"{p}.self_attn.v_proj.weight", (kv * d, D))
    for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
                 "pre_feedforward_layernorm_2"):
        out[norm] = _spec(f"{p}.{norm}.weight", (D,))
    return out


def expert_specs(cfg: TextConfig, i: int) -> dict[str, TensorSpec]:
    D, E, I = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    p = f"{DECODER}.layers.{i}.experts"
    return {"gate_up": _spec(f"{p}.gate_up_proj", (E, 2 * I, D)), "down": _spec(f"{p}.down_proj", (E, D, I))}
