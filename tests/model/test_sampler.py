"""Sampler pieces against the reference's own classes, and settings validation."""

from __future__ import annotations

import pytest
import torch

from dgserve.model.errors import ConfigError
from dgserve.model.sampler import SamplerSettings, entropy, finalize_block


def test_entropy_is_bitwise_the_categorical_entropy():
    z = torch.randn(64, 3000, generator=torch.Generator().manual_seed(0)) * 7
    assert torch.equal(entropy(z), torch.distributions.Categorical(logits=z).entropy())


def test_temperatures_are_the_reference_schedule():
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        LinearTemperatureScheduleLogitsProcessor,
    )

    s = SamplerSettings(max_denoising_steps=48, t_min=0.4, t_max=0.8)
    proc = LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=48)
    scores = torch.randn(1, 4, 50, generator=torch.Generator().manual_seed(1)) * 9
    temps = s.temperatures()
    for n in range(1, 49):
        expected = proc(None, scores, cur_step=torch.tensor(n, dtype=torch.int32))
        assert torch.equal(scores / temps[n], expected)


@pytest.mark.parametrize(("field", "value"), [
    ("max_denoising_steps", 0), ("max_denoising_steps", 5000), ("max_new_tokens", 0), ("entropy_bound", 0.0),
    ("t_min", -0.1), ("t_max", 0.1), ("stability_threshold", -1), ("confidence_threshold", 0.0),
    ("max_denoising_steps", 2.5),
])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SamplerSettings.from_defaults(SamplerSettings(), **{field: value})


def test_unknown_knob_is_refused():
    with pytest.raises(ConfigError, match="top_p"):
        SamplerSettings.from_defaults(SamplerSettings(), top_p=0.9)


def test_overrides_default_to_the_checkpoint():
    s = SamplerSettings.from_defaults(SamplerSettings(eos_token_ids=(1, 106), pad_token_id=0),
                                      max_new_tokens=64, t_min=None)
    assert (s.max_new_tokens, s.t_min, s.eos_token_ids, s.pad_token_id) == (64, 0.4, (1, 106), 0)


def test_finalize_pads_after_the_first_eos_and_keeps_it():
    s = SamplerSettings(eos_token_ids=(1, 106), pad_token_id=0)
    assert finalize_block([5, 6, 106, 7, 1, 8], s) == ([5, 6, 106, 0, 0, 0], True)
    assert finalize_block([5, 6, 7], s) == ([5, 6, 7], False)
    no_pad = SamplerSettings(eos_token_ids=(1,), pad_token_id=None)
    assert finalize_block([5, 1, 7], no_pad) == ([5, 1, 7], True)


def test_a_stability_threshold_beyond_the_step_cap_is_the_step_cap_and_allocates_no_more(confident_dir):
    """2^32 - 1 once asked for a [2^32 - 1, C] history (1 TiB) and failed its whole engine step. Any threshold >= the
    step cap can never be met within a block, so it gives the tokens of threshold = cap, with a bounded history."""
    from dgserve.model.generate import generate
    from dgserve.model.loader import load_checkpoint

    ck = load_checkpoint(confident_dir, dtype="float32")
    base = SamplerSettings.from_defaults(ck.generation, max_new_tokens=64, max_denoising_steps=6)
    runs = {k: generate(ck.model, [2, 40, 41, 42], SamplerSettings.from_defaults(base, stability_threshold=k), seed=5)
            for k in (1, 6, 7, 2**32 - 1)}
    assert runs[1].steps_per_block != runs[6].steps_per_block  # the threshold matters on this model
    for k in (7, 2**32 - 1):
        assert runs[k].token_ids == runs[6].token_ids and runs[k].steps_per_block == runs[6].steps_per_block


def test_a_fused_step_decides_as_the_exact_step_on_the_same_logits(tiny_dir):
    """The same hidden states through the exact step (logits, softmax, entropy) and through the fused vocabulary
    pass: the same argmax, entropies within float32 rounding, so the same accepted positions and stop decision;
    the self-conditioning input matches the exact path's soft embedding."""
    from dgserve.kernels.vocab import vocab_pass
    from dgserve.model.loader import load_checkpoint
    from dgserve.model.sampler import BlockDenoiser, NoiseStream

    ck = load_checkpoint(tiny_dir, dtype="float32")
    m, C = ck.model, ck.config.canvas_length
    s = SamplerSettings.from_defaults(ck.generation, entropy_bound=2.0)
    h = m.final_norm(torch.randn(C, ck.config.text.hidden_size, generator=torch.Generator().manual_seed(4)))

    def block(fused: bool) -> BlockDenoiser:
        noise = NoiseStream(torch.Generator().manual_seed(1), C, ck.config.text.vocab_size, False, fused)
        return BlockDenoiser(s, noise, s.temperatures())

    exact, fused = block(False), block(True)
    assert torch.equal(exact.canvas_C, fused.canvas_C)  # each block's first canvas is drawn the same way
    want = exact.step(m.logits(h), m.dtype)
    keys, renoise = fused.noise.step_keys()
    out = vocab_pass(h, m.weights.embed, ck.config.text.final_logit_softcapping,
                     fused.temperature.expand(C), keys)
    got = fused.step_fused(out, renoise)
    assert torch.equal(got.argmax_C, want.argmax_C)
    assert got.accepted == want.accepted and 0 < got.accepted < C and got.stop == want.stop
    assert abs(got.mean_entropy - want.mean_entropy) < 1e-5
    torch.testing.assert_close(m.soft_from_mean(out.soft_CD), m.soft_embedding(exact.soft_source_CV),
                               rtol=1e-5, atol=1e-5)
