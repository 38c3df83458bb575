"""make-tiny: the real layout, deterministic, readable by transformers, same tokens as the reference."""

from __future__ import annotations

import hashlib
import json

import torch

from dgserve.model.generate import generate
from dgserve.model.loader import load_checkpoint
from dgserve.model.sampler import SamplerSettings
from dgserve.model.tiny import FIXED_SPECIAL, make_tiny
from dgserve.model.tokenizer import chat_prompt_ids, decode, load_tokenizer
from tests.reference import load_reference, reference_generate


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_layout_is_the_real_checkpoint_layout(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= names
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) >= 2 and all(s.startswith("model-000") for s in shards)
    weight_map = json.loads((tiny_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.decoder.embed_tokens.weight" in weight_map and "lm_head.weight" not in weight_map
    assert "model.encoder.language_model.layers.0.layer_scalar" in weight_map
    assert "model.decoder.layers.2.self_attn.v_proj.weight" not in weight_map  # full layer: V from k_proj
    assert "model.encoder.embed_vision.embedding_projection.weight" in weight_map


def test_deterministic_from_the_seed(tmp_path, tiny_dir):
    again = make_tiny(tmp_path / "again", seed=0)
    other = make_tiny(tmp_path / "other", seed=1)
    assert _digest(again) == _digest(tiny_dir)
    assert _digest(other)["model-00001-of-00003.safetensors"] != _digest(tiny_dir)["model-00001-of-00003.safetensors"]


def test_norms_and_scales_are_not_trivial(tiny_dir):
    w = load_checkpoint(tiny_dir).model.weights
    assert not torch.allclose(w.layers[0].input_layernorm, torch.ones_like(w.layers[0].input_layernorm))
    assert float(w.layers[0].layer_scalar) != 1.0


def test_tokenizer_carries_the_gemma4_special_tokens_and_chat_format(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    for i, t in FIXED_SPECIAL.items():
        assert tok.convert_tokens_to_ids(t) == i
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert tok.convert_tokens_to_ids("<|image|>") == cfg["image_token_id"]
    text = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == "<bos><|turn>user\nHi there<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    thinking = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                       tokenize=False, enable_thinking=True)
    assert thinking == "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    ids = chat_prompt_ids(tok, "Hello world, how are you?")
    assert ids[0] == 2 and decode(tok, ids, 0).endswith("Hello world, how are you?\nmodel\nthought\n")


def test_tool_declaration_and_call_format(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    tools = [{"type": "function", "function": {"name": "list_dir", "description": "List a folder",
                                               "parameters": {"type": "object", "required": ["path"],
                                                              "properties": {"path": {"type": "string",
                                                                                      "description": "Folder"}}}}}]
    msgs = [{"role": "user", "content": "ls /tmp"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "list_dir", "arguments": {"path": "/tmp"}}}]},
            {"role": "tool", "name": "list_dir", "content": "a.txt"}]
    text = tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ('<|tool>declaration:list_dir{description:<|"|>List a folder<|"|>,parameters:{properties:{path:'
            '{description:<|"|>Folder<|"|>,type:<|"|>STRING<|"|>}},required:[<|"|>path<|"|>],'
            'type:<|"|>OBJECT<|"|>}}<tool|>') in text
    assert text.endswith('<|turn>model\n<|tool_call>call:list_dir{path:<|"|>/tmp<|"|>}<tool_call|>'
                         '<|tool_response>response:list_dir{value:<|"|>a.txt<|"|>}<tool_response|>')


def test_transformers_loads_it_and_generates_the_same_tokens(tiny_dir):
    from transformers import DiffusionGemmaForBlockDiffusion

    _, info = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_dir, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor names
    ref = load_reference(tiny_dir)
    ck = load_checkpoint(tiny_dir)
    prompt = chat_prompt_ids(load_tokenizer(tiny_dir), "Tell me a story")
    expected, _ = reference_generate(ref, prompt, 4, max_new_tokens=40, max_denoising_steps=10)
    got = generate(ck.model, prompt, SamplerSettings.from_defaults(ck.generation, max_new_tokens=40,
                                                                   max_denoising_steps=10), seed=4)
    # At least one whole block; whether the sampler draws EOS in the first block depends on the CPU's float
    # rounding (this seed stopped after one block on one CI machine and ran two on another): the tokens must match.
    assert got.token_ids == expected and len(expected) in (32, 64)
