"""Checkpoints already quantized with compressed-tensors (make-tiny --experts-dtype fp8 writes one with that
library): experts load as stored, a quantized dense layer is dequantized, and every scheme, format, layout or
tensor the loader does not read is refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dgserve.model.errors import CheckpointError
from dgserve.model.generate import generate
from dgserve.model.loader import load_checkpoint, load_expert_shard
from dgserve.model.settings import SamplerSettings
from dgserve.model.tiny import make_tiny


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("fp8") / "ckpt", experts_dtype="fp8", quantize_dense=True)


def stored(folder, name: str) -> torch.Tensor:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(folder / index[name], framework="pt") as f:
        return f.get_tensor(name)


def test_the_experts_load_as_stored_and_the_dense_mlp_is_dequantized(fp8_dir, tiny_dir):
    ck = load_checkpoint(fp8_dir)
    assert ck.experts_dtype == "fp8"
    w = ck.model.experts.layers[1]
    I = ck.config.text.moe_intermediate_size
    gate = stored(fp8_dir, "model.decoder.layers.1.experts.3.gate_proj.weight")
    up_scale = stored(fp8_dir, "model.decoder.layers.1.experts.3.up_proj.weight_scale")
    assert gate.dtype == torch.float8_e4m3fn and up_scale.shape == (I, 1)
    assert torch.equal(w.gate_up[3, :I].view(torch.uint8), gate.view(torch.uint8))
    assert torch.equal(w.gate_up_scale[3, I:], up_scale.reshape(-1))
    plain = load_checkpoint(tiny_dir).model  # the same seed: the same weights before quantization
    lw, pw = ck.model.weights.layers[1], plain.weights.layers[1]
    assert torch.equal(lw.q_proj, pw.q_proj)  # left in bf16 by the checkpoint: as stored
    rel = (lw.mlp_gate - pw.mlp_gate).norm() / pw.mlp_gate.norm()
    assert lw.mlp_gate.dtype == torch.float32 and 0 < rel < 0.05  # FP8 in the checkpoint, dequantized at load
    s = SamplerSettings.from_defaults(ck.generation, max_new_tokens=32, max_denoising_steps=4)
    assert len(generate(ck.model, [2, 5, 6], s).token_ids) == 32


def test_an_expert_rank_reads_only_its_experts_of_a_quantized_checkpoint(fp8_dir):
    shard = load_expert_shard(fp8_dir, [2, 6])
    whole = load_expert_shard(fp8_dir, list(range(8)))
    assert shard.layers[0].fp8 and shard.layers[0].gate_up.shape[0] == 2
    assert shard.bytes_read * 3 < whole.bytes_read


def edited(fp8_dir, tmp_path, quantization=None, extra: dict | None = None, drop_experts: bool = False):
    folder = tmp_path / "edited"
    shutil.copytree(fp8_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    if quantization is not None:
        cfg["quantization_config"] = quantization(cfg["quantization_config"])
    (folder / "config.json").write_text(json.dumps(cfg))
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    if extra:
        save_file(extra, folder / "extra.safetensors")
        index["weight_map"] |= dict.fromkeys(extra, "extra.safetensors")
    if drop_experts:  # experts stored fused, as in the bf16 checkpoint
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if ".experts." not in k}
        fused = {"model.decoder.layers.0.experts.gate_up_proj": torch.zeros(8, 64, 64, dtype=torch.float8_e4m3fn)}
        save_file(fused, folder / "fused.safetensors")
        index["weight_map"] |= dict.fromkeys(fused, "fused.safetensors")
    index_path.write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize(("change", "message"), [
    (lambda q: q | {"config_groups": {"NVFP4": ["re:.*experts.*"]}}, "scheme 'NVFP4' (weights 4-bit float"),
    (lambda q: q | {"config_groups": {"FP8_BLOCK": ["re:.*experts.*"]}},
     "scheme 'FP8_BLOCK' (weights 8-bit float block"),
    (lambda q: q | {"config_groups": {"W8A8": ["re:.*experts.*"]}}, "scheme 'W8A8' (weights 8-bit int"),
    (lambda q: q | {"format": "pack-quantized"}, "format 'pack-quantized' is not supported"),
    (lambda q: q | {"quant_method": "gptq"}, "quant_method 'gptq' is not read"),
])
def test_unsupported_quantization_is_refused_naming_it(fp8_dir, tmp_path, change, message):
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        load_checkpoint(edited(fp8_dir, tmp_path, quantization=change))


def test_a_tensor_of_another_scheme_is_refused_by_name(fp8_dir, tmp_path):
    extra = {"model.decoder.layers.0.experts.0.gate_proj.input_scale": torch.ones(1)}
    with pytest.raises(CheckpointError, match=r"unexpected tensor model.decoder.layers.0.experts.0.gate_proj.input_"
                                              r"scale \(input_scale\)"):
        load_checkpoint(edited(fp8_dir, tmp_path, extra=extra))


def test_fused_fp8_experts_are_refused_naming_the_layout(fp8_dir, tmp_path):
    with pytest.raises(CheckpointError, match=r"experts.0.gate_proj.weight is missing: .*per-expert layout.*it stores "
                                              r"model.decoder.layers.0.experts.gate_up_proj"):
        load_checkpoint(edited(fp8_dir, tmp_path, drop_experts=True))
