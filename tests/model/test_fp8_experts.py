"""FP8 experts loaded from a full-precision checkpoint (experts_dtype "fp8"): quantized at load per output channel,
served by both expert paths, counted in bytes as they are held, and refused by name when asked wrongly."""

from __future__ import annotations

import pytest
import torch

from dgserve.cluster.engine.fit import plan_fit, weight_bytes
from dgserve.kernels.fp8 import FP8
from dgserve.model.errors import ConfigError
from dgserve.model.loader import load_checkpoint, load_expert_shard, read_experts
from dgserve.model.moe import LocalExperts
from dgserve.model.tiny import real_config


@pytest.fixture(scope="module")
def fp8(tiny_dir):
    return load_checkpoint(tiny_dir, experts_dtype="fp8")


def test_experts_are_held_in_fp8_with_a_scale_per_output_channel(fp8, tiny_dir):
    cfg = fp8.config.text
    w = fp8.model.experts.layers[0]
    E, I, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    assert w.fp8 and w.gate_up.dtype == w.down.dtype == FP8
    assert w.gate_up_scale.shape == (E, 2 * I) and w.down_scale.shape == (E, D)
    assert fp8.experts_dtype == "fp8" and fp8.model.weights.layers[0].q_proj.dtype == torch.float32  # rest as is
    held = sum(x.nbytes() for x in fp8.model.experts.layers)
    assert held == weight_bytes(fp8.config, torch.float32, attention=False, experts_dtype="fp8")
    shard = load_expert_shard(tiny_dir, [1, 5], experts_dtype="fp8")  # an expert rank's share
    assert shard.layers[0].gate_up.dtype == FP8 and shard.nbytes() == weight_bytes(
        fp8.config, torch.float32, experts=[1, 5], attention=False, experts_dtype="fp8")


def test_both_expert_paths_serve_fp8_experts_alike(fp8):
    g = torch.Generator().manual_seed(0)
    cfg = fp8.config.text
    rows = torch.randn(40, cfg.hidden_size, generator=g)
    ids = torch.rand(40, cfg.num_experts, generator=g).topk(cfg.top_k_experts, -1).indices
    weights = torch.rand(40, cfg.top_k_experts, generator=g)
    layers = fp8.model.experts.layers
    exact = LocalExperts(layers, graph_safe=False)(0, rows, ids, weights)
    safe = LocalExperts(layers, graph_safe=True)(0, rows, ids, weights)
    torch.testing.assert_close(safe, exact, rtol=1e-5, atol=1e-5)


def test_fp8_argmax_canvases_agree_with_full_precision_on_peaked_logits(confident_dir):
    """On the tiny model with a planted copy path (logits peaked as a trained model's; the plain tiny model is
    chaotic: bf16 alone moves its logits by about 1), FP8 experts keep the argmax canvas."""
    prompt, canvas = torch.arange(3, 60), torch.arange(100, 132)
    out = []
    for experts_dtype in ("auto", "fp8"):
        m = load_checkpoint(confident_dir, experts_dtype=experts_dtype).model
        kv = m.new_cache()
        m.encode(kv, prompt)
        out.append(m.denoise(kv, canvas, None))
    assert (out[0].argmax(-1) == out[1].argmax(-1)).float().mean() >= 0.9


class MetaReader:
    def read(self, spec, dtype, rows=None):
        shape = spec.shape if rows is None else (len(rows), *spec.shape[1:])
        return torch.empty(shape, dtype=dtype, device="meta")


def test_the_real_experts_in_fp8_take_half_the_bytes_and_32_long_requests_fit_an_h100():
    real = real_config()
    layers = read_experts(MetaReader(), real, torch.bfloat16, range(real.text.num_experts), "fp8")
    held = sum(w.nbytes() for w in layers)
    bf16 = weight_bytes(real, torch.bfloat16, attention=False)
    assert held == weight_bytes(real, torch.bfloat16, attention=False, experts_dtype="fp8")
    assert held / bf16 <= 0.51
    h100 = 80 * 1000 ** 3
    plan = plan_fit(real, torch.bfloat16, h100, running=32, prompt_tokens=4096, new_tokens=256, fused=True,
                    experts_dtype="fp8")
    assert plan.canvases >= 32, plan.verdict()
    bf16_plan = plan_fit(real, torch.bfloat16, h100, running=32, prompt_tokens=4096, new_tokens=256, fused=True)
    assert plan.canvases > 2 * bf16_plan.canvases  # 22.8 GB of weights freed for KV


def test_an_unknown_experts_dtype_is_refused_by_name(tiny_dir):
    with pytest.raises(ConfigError, match="experts_dtype='int4'; allowed: auto | fp8"):
        load_checkpoint(tiny_dir, experts_dtype="int4")


def test_an_engine_batches_fp8_experts_as_invisibly_as_full_precision(fp8):
    """CPU float32 with FP8 experts: activations are quantized per token (row by row) and the FP8 values multiply
    in float32 GEMMs, so batching keeps every request's tokens bitwise, as without FP8."""
    from dgserve.cluster.engine import Engine, EngineConfig, EngineRequest
    from dgserve.model.generate import generate
    from dgserve.model.sampler import SamplerSettings

    reqs = [EngineRequest(list(range(5, 5 + n)), SamplerSettings.from_defaults(
        fp8.generation, max_new_tokens=64, max_denoising_steps=6), seed=n) for n in (3, 17, 40)]
    with Engine(fp8.model, EngineConfig(max_running=3)) as engine:
        streams = [engine.submit(r) for r in reqs]
        got = [list(s.result(60).token_ids) for s in streams]
    assert got == [generate(fp8.model, r.prompt_ids, r.settings, seed=r.seed).token_ids for r in reqs]
