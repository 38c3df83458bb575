"""Config parsing: both checkpoint forms, transformers' defaults, and errors that name the field."""

from __future__ import annotations

import copy
import json

import pytest

from dgserve.model.config import (
    generation_defaults_from_dict,
    load_generation_defaults,
    load_model_config,
    model_config_from_dict,
)
from dgserve.model.errors import ConfigError
from dgserve.model.sampler import SamplerSettings


def _raw(tiny_dir):
    return json.loads((tiny_dir / "config.json").read_text())


def test_shipped_form_and_save_pretrained_form_agree(tiny_dir, ref_folders):
    cfg = load_model_config(tiny_dir)  # global_head_dim / num_global_key_value_heads
    full = [s for s in cfg.text.layers if s.kind == "full"]
    assert {(s.head_dim, s.num_kv_heads) for s in full} == {(32, 1)}
    assert cfg.text.layers[-1].kind == "full"
    raw = _raw(tiny_dir)
    tc = raw["text_config"]
    per_layer = {str(i): {"head_dim": 32, "num_key_value_heads": 1}
                 for i, t in enumerate(tc["layer_types"]) if t == "full_attention"}
    del tc["global_head_dim"], tc["num_global_key_value_heads"]
    tc["per_layer_config"] = per_layer
    assert model_config_from_dict(raw).text.layers == cfg.text.layers
    saved = load_model_config(ref_folders("b"))  # written by transformers' save_pretrained
    assert [s.kind for s in saved.text.layers] == ["sliding", "sliding", "full"]
    assert saved.text.layers[-1].head_dim == 16 and saved.text.layers[-1].num_kv_heads == 2


@pytest.mark.parametrize(("path", "value", "field"), [
    (("text_config", "top_k_experts"), 99, "top_k_experts"),
    (("text_config", "num_key_value_heads"), 3, "num_key_value_heads"),
    (("text_config", "layer_types"), ["sliding_attention"] * 5 + ["dense"], "layer_types"),
    (("text_config", "hidden_size"), -4, "hidden_size"),
    (("text_config", "hidden_activation"), "relu", "hidden_activation"),
    (("text_config", "rope_parameters"), {"sliding_attention": {"rope_type": "yarn", "rope_theta": 1.0},
                                          "full_attention": {"rope_type": "default", "rope_theta": 1.0}},
     "rope_type"),
    (("canvas_length",), 0, "canvas_length"),
    (("text_config", "final_logit_softcapping"), -1.0, "final_logit_softcapping"),
    (("model_type",), "llama", "model_type"),
])
def test_invalid_values_name_the_field(tiny_dir, path, value, field):
    raw = copy.deepcopy(_raw(tiny_dir))
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ConfigError) as e:
        model_config_from_dict(raw)
    assert field in str(e.value)


def test_missing_required_field_is_named(tiny_dir):
    raw = _raw(tiny_dir)
    del raw["text_config"]["num_experts"]
    with pytest.raises(ConfigError, match="num_experts"):
        model_config_from_dict(raw)


def test_every_generation_default_comes_from_the_checkpoint():
    g = generation_defaults_from_dict({
        "max_new_tokens": 77, "max_denoising_steps": 9, "t_min": 0.2, "t_max": 0.9, "stability_threshold": 2,
        "confidence_threshold": 0.01, "eos_token_id": 7, "pad_token_id": 3,
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.3}})
    assert g == SamplerSettings(max_new_tokens=77, max_denoising_steps=9, entropy_bound=0.3, t_min=0.2, t_max=0.9,
                                stability_threshold=2, confidence_threshold=0.01, eos_token_ids=(7,), pad_token_id=3)


def test_generation_defaults_follow_the_checkpoint_and_fill_nulls(tiny_dir):
    g = load_generation_defaults(tiny_dir)
    assert g == SamplerSettings(max_new_tokens=256, max_denoising_steps=48, entropy_bound=0.1, t_min=0.4,
                                t_max=0.8, stability_threshold=1, confidence_threshold=0.005,
                                eos_token_ids=(1, 106, 50), pad_token_id=0)
    nulls = generation_defaults_from_dict({"max_denoising_steps": None, "sampler_config": None, "t_min": None})
    assert nulls.max_denoising_steps == 48 and nulls.eos_token_ids == () and nulls.pad_token_id is None


def test_a_bad_generation_config_value_is_named_with_its_file():
    with pytest.raises(ConfigError, match="generation_config.json: invalid max_denoising_steps=0"):
        generation_defaults_from_dict({"max_denoising_steps": 0})
