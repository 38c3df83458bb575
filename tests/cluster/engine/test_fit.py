"""Will it fit, planned from the real 26B-A4B config alone (no weights): bytes per rank, requests admitted per
device, and the verdicts a unit would print."""

from __future__ import annotations

import pytest
import torch

from dgserve.cluster.engine.budget import MemorySizes
from dgserve.cluster.engine.fit import plan_fit, weight_bytes
from dgserve.model.tiny import real_config

GiB = 1 << 30
H100 = 81_559 * 2**20  # what an 80 GB H100 reports
H200 = 139 * GiB  # what this workplace's H200 reports (141 GB nominal)


@pytest.fixture(scope="module")
def real():
    return real_config()


def test_the_real_text_weights_per_rank(real):
    """25.25 B parameters: 50.5 GB in bfloat16; an attention rank without experts 4.8 GB; an expert rank with 16
    of the 128 experts an eighth of the rest."""
    every = weight_bytes(real, torch.bfloat16)
    attention = weight_bytes(real, torch.bfloat16, experts=[])
    experts16 = weight_bytes(real, torch.bfloat16, experts=range(16), attention=False)
    assert 50.4e9 < every < 50.6e9 and 4.7e9 < attention < 4.9e9
    assert experts16 * 8 == every - attention
    assert weight_bytes(real, torch.float32) == 2 * every  # the old float32 default: 101 GB


@pytest.mark.parametrize(("device", "name"), [(H200, "H200"), (H100, "H100")])
def test_32_requests_with_4096_token_prompts_fit_one_gpu_in_bfloat16_with_the_fused_sampler(real, device, name,
                                                                                             capsys):
    fused = plan_fit(real, torch.bfloat16, device, running=32, prompt_tokens=4096, new_tokens=256, fused=True)
    exact = plan_fit(real, torch.bfloat16, device, running=32, prompt_tokens=4096, new_tokens=256, fused=False)
    with capsys.disabled():
        print(f"\n{name} bf16, fused sampler: {fused.verdict()}\n{name} bf16, exact sampler: {exact.verdict()}")
    assert fused.fits and fused.canvases >= 32 and fused.verdict().startswith("fits")
    assert exact.canvases < fused.canvases  # the [C, V] noise per canvas
    # per request: KV of 25 sliding layers (1023 positions x 8 heads x 256) and 5 full ones (4352 positions x 2 x
    # 512), K and V in bf16, plus the canvas's bf16 soft input and the fused pass's scratch
    kv = 2 * 2 * (25 * 1023 * 8 * 256 + 5 * 4352 * 2 * 512)
    assert kv < fused.request_bytes <= kv + 256 * 2816 * 2 + 16 * 2**20
    assert fused.request_bytes == MemorySizes(real, torch.bfloat16, 256, fused=True, device="cuda").request(4352)


def test_a_device_the_weights_fill_gets_a_verdict_that_says_what_to_change(real):
    small = plan_fit(real, torch.bfloat16, 48 * GiB, running=8, prompt_tokens=4096, new_tokens=256, fused=True)
    assert not small.fits and "weights leave no room" in small.verdict() and "FP8 experts" in small.verdict()
    tight = plan_fit(real, torch.bfloat16, 64 * GiB, running=64, prompt_tokens=32_768, new_tokens=256, fused=True)
    assert not tight.fits and f"lower engine.max_running to {tight.canvases}" in tight.verdict()
    split = plan_fit(real, torch.bfloat16, 48 * GiB, running=8, prompt_tokens=4096, new_tokens=256, fused=True,
                     experts=[])  # an attention rank of a packed unit holds no expert
    assert split.fits


def test_the_budget_is_derived_from_the_devices_free_memory_unless_set(monkeypatch, tiny):
    from dgserve.cluster.engine import Engine, EngineConfig
    from dgserve.cluster.engine.fit import CPU_BUDGET, derived_budget, resolve_budget

    # 80 GiB device, 52 GiB in use after loading: 0.9 x 80 - 52 - 2 (reserve) = 18 GiB
    assert derived_budget(28 * GiB, 80 * GiB, 0.9) == int(0.9 * 80 * GiB) - 52 * GiB - 2 * GiB
    assert derived_budget(1 * GiB, 80 * GiB, 0.9) == 0  # never negative: every request is then refused
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (28 * GiB, 80 * GiB))
    assert resolve_budget(None, 0.9, torch.device("cuda")) == derived_budget(28 * GiB, 80 * GiB, 0.9)
    assert resolve_budget(None, 0.5, torch.device("cuda")) == derived_budget(28 * GiB, 80 * GiB, 0.5)
    assert resolve_budget(5 * GiB, 0.9, torch.device("cuda")) == 5 * GiB  # set: as set
    assert Engine(tiny.model, EngineConfig()).budget_bytes == CPU_BUDGET
    assert Engine(tiny.model, EngineConfig(memory_budget_bytes=123_456)).budget_bytes == 123_456


def test_a_hub_checkpoint_loads_in_bfloat16_on_cuda_and_float32_on_cpu_by_default():
    from dgserve.cluster.config import parse_topology
    from dgserve.model.loader import parse_dtype

    assert parse_topology({"device": "cuda"}).weights_dtype == "bfloat16"
    assert parse_topology({}).weights_dtype == "float32"
    assert parse_topology({"device": "cuda", "dtype": "float32"}).weights_dtype == "float32"
    assert parse_dtype("auto", "cuda") is torch.bfloat16 and parse_dtype("auto", "cpu") is torch.float32


def test_the_start_up_check_refuses_a_gpu_the_weights_fill_and_reports_the_verdict_otherwise(real):
    from dgserve.cluster.engine import EngineConfig
    from dgserve.cluster.engine.fit import check_device
    from dgserve.model.errors import ConfigError

    engine = EngineConfig(max_running=32)
    with pytest.raises(ConfigError, match="start-up check: invalid device=.*weights leave no room"):
        check_device(real, torch.bfloat16, 48 * GiB, engine, fused=True)
    with pytest.raises(ConfigError, match="does not fit"):  # float32 weights: 101 GB
        check_device(real, torch.float32, H100, engine, fused=True)
    assert check_device(real, torch.bfloat16, H200, engine, fused=True).verdict().startswith("fits")
    assert check_device(real, torch.bfloat16, 48 * GiB, engine, fused=True, experts=[]).fits  # attention rank


class MetaReader:
    """A checkpoint reader that makes every tensor of its spec's shape on the meta device (no data)."""

    def read(self, spec, dtype, rows=None):
        shape = spec.shape if rows is None else (len(rows), *spec.shape[1:])
        return torch.empty(shape, dtype=dtype, device="meta")


def test_the_real_model_built_on_the_meta_device_holds_what_the_plan_counts(real):
    """The real 26B-A4B model, built tensor by tensor on the meta device by the loader's own readers: the attention
    rank of a packed 1 + 8 unit, and expert rank 0 (16 experts), hold exactly the planned bytes."""
    from dgserve.cluster.experts.partition import ExpertPartition
    from dgserve.model.loader import read_experts, read_text_weights
    from dgserve.model.moe import LocalExperts
    from dgserve.model.transformer import DiffusionGemma

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    text = read_text_weights(MetaReader(), real, torch.bfloat16)
    model = DiffusionGemma(real, text, LocalExperts([], (), real.text.num_experts))
    assert model.device.type == "meta"
    held = nbytes(t for t in vars(text).values() if isinstance(t, torch.Tensor)) + nbytes(
        t for lw in text.layers for t in vars(lw).values() if isinstance(t, torch.Tensor))
    assert held == weight_bytes(real, torch.bfloat16, experts=[])
    mine = ExpertPartition.balanced(real.text.num_experts, 8).experts_of(0)
    shard = read_experts(MetaReader(), real, torch.bfloat16, mine)
    assert nbytes(t for w in shard for t in (w.gate_up, w.down)) == weight_bytes(
        real, torch.bfloat16, experts=mine, attention=False)
