"""Will it fit, planned from the real 26B-A4B config alone (no weights): bytes per rank, requests admitted per
device, and the verdicts a unit would print."""

from __future__ import annotations

import pytest
import torch

from dgserve.cluster.engine.budget import MemorySizes
from dgserve.cluster.engine.fit import plan_fit, weight_bytes
from tests.real_config import real_config

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
    sizes = MemorySizes(real, torch.bfloat16, 256, fused=True, device="cuda")
    assert fused.request_bytes == sizes.request(4096 + 256)  # the engine's own accounting


def test_a_device_the_weights_fill_gets_a_verdict_that_says_what_to_change(real):
    small = plan_fit(real, torch.bfloat16, 48 * GiB, running=8, prompt_tokens=4096, new_tokens=256, fused=True)
    assert not small.fits and "weights leave no room" in small.verdict() and "FP8 experts" in small.verdict()
    tight = plan_fit(real, torch.bfloat16, 64 * GiB, running=64, prompt_tokens=32_768, new_tokens=256, fused=True)
    assert not tight.fits and f"lower engine.max_running to {tight.canvases}" in tight.verdict()
    split = plan_fit(real, torch.bfloat16, 48 * GiB, running=8, prompt_tokens=4096, new_tokens=256, fused=True,
                     experts=[])  # an attention rank of a packed unit holds no expert
    assert split.fits
