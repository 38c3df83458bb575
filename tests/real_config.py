"""The real google/diffusiongemma-26B-A4B-it config (MODEL_SPEC section 1) as a ModelConfig, written by the
tiny-checkpoint writer with the real sizes, for planning memory without the checkpoint's files."""

from __future__ import annotations

from dgserve.model.config import model_config_from_dict
from dgserve.model.tiny import TinyPreset, _config_json

REAL = TinyPreset(vocab_size=262_144, hidden_size=2816, intermediate_size=2112, moe_intermediate_size=704,
                  num_experts=128, top_k_experts=8, num_hidden_layers=30, full_every=6, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2,
                  sliding_window=1024, canvas_length=256, max_position_embeddings=262_144)
MEDIA = {"<|image>": 255_999, "<|image|>": 258_880, "<image|>": 258_882, "<|video|>": 258_884}


def real_config():
    return model_config_from_dict(_config_json(REAL, MEDIA))
