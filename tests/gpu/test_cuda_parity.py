"""GPU checks (skipped without CUDA): the same parity as on CPU, on the device, in float32 and bfloat16: teacher-forced
float32 logits within 1e-4 of the reference, both sides consuming the same random numbers in the same order
(benchmarks/parity_probe.py), generation token-exact over seeds."""

from __future__ import annotations

import pytest
import torch

from dgserve.model.generate import generate
from dgserve.model.loader import load_checkpoint
from dgserve.model.sampler import SamplerSettings
from tests.reference import SPECS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _reference(folder, dtype):
    from transformers import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    return model.cuda().eval()


@torch.inference_mode()
def _ref_generate(ref, prompt, seed, **kw):
    torch.manual_seed(seed)
    out = ref.generate(torch.tensor([prompt], device="cuda"), **kw)
    return out.sequences[0, len(prompt):].tolist()


@torch.inference_mode()
def test_cuda_float32_teacher_forced_logits_within_1e4_and_the_same_random_calls(tiny_dir):
    from transformers import DiffusionGemmaForBlockDiffusion

    from benchmarks.parity_probe import _forced_logits, _generate_both

    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_dir, dtype=torch.float32,
                                                          attn_implementation="sdpa").cuda().eval()
    ck = load_checkpoint(tiny_dir, dtype="float32", device="cuda")
    assert _forced_logits(ref, ck, "cuda") < 1e-4
    _, _, ref_calls, our_calls = _generate_both(ref, ck, "cuda", seed=0, blocks=2, steps=8, log=True)
    assert [c.state for c in our_calls] == [c.state for c in ref_calls]


@pytest.mark.parametrize("name", ["a", "b"])
def test_cuda_float32_generate_is_token_exact(ref_folders, name):
    folder = ref_folders(name)
    # float32 named: the default ("auto") loads bfloat16 on CUDA
    ref, ck = _reference(folder, torch.float32), load_checkpoint(folder, dtype="float32", device="cuda")
    C = SPECS[name].canvas_length
    for seed in range(3):
        prompt = [2, 11 + seed, 12, 13, 14]
        expected = _ref_generate(ref, prompt, seed, max_new_tokens=3 * C, max_denoising_steps=12)
        s = SamplerSettings.from_defaults(ck.generation, max_new_tokens=3 * C, max_denoising_steps=12)
        assert generate(ck.model, prompt, s, seed=seed).token_ids == expected


@torch.inference_mode()
def test_cuda_bfloat16_logits_close_and_steps_alike(tiny_dir):
    """bf16 is compared by distribution: decoder logits close, steps per block alike over seeds."""
    from transformers import DynamicCache

    ref, ck = _reference(tiny_dir, torch.bfloat16), load_checkpoint(tiny_dir, dtype="bfloat16", device="cuda")
    prompt = torch.arange(2, 50, device="cuda")
    canvas = torch.arange(100, 132, device="cuda")
    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    ref.model.encoder(input_ids=prompt[None], past_key_values=cache)
    expected = ref(past_key_values=cache, decoder_input_ids=canvas[None]).logits[0]
    kv = ck.model.new_cache()
    ck.model.encode(kv, prompt)
    got = ck.model.denoise(kv, canvas, None)
    assert (got - expected).abs().max() < 0.25  # bf16 rounding of 6 layers; fp32 parity is exact above
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
