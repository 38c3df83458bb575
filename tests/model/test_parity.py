"""Parity with transformers 5.23.0 on tiny random configs, in float32: three small ones that differ in every
shape, and one with the real checkpoint's structure at small width (test_parity_real.py).

The reference is saved with save_pretrained and loaded back with from_pretrained (sdpa, dynamic cache); our
loader reads the same folder.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dgserve.model.generate import generate
from dgserve.model.loader import load_checkpoint
from dgserve.model.sampler import SamplerSettings
from tests.reference import SPECS, load_reference, reference_generate

TOL = 1e-4
SPEC_NAMES = ("a", "b", "c")


def prompt_ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab - 4, (n,), generator=g)


def _pair(ref_folders, name):
    folder = ref_folders(name)
    return load_reference(folder), load_checkpoint(folder).model


@pytest.mark.parametrize("name", SPEC_NAMES)
@pytest.mark.parametrize("prompt_vs_window", ["shorter", "longer"])
@torch.inference_mode()
def test_encoder_cache_and_decoder_logits_match(ref_folders, name, prompt_vs_window):
    from transformers import DynamicCache

    ref, ours = _pair(ref_folders, name)
    spec = SPECS[name]
    n = spec.sliding_window - 3 if prompt_vs_window == "shorter" else 3 * spec.sliding_window + 2
    prompt = prompt_ids(n, spec.vocab_size, seed=n)
    canvas = prompt_ids(spec.canvas_length, spec.vocab_size, seed=99)
    sc_logits = torch.randn(1, spec.canvas_length, spec.vocab_size, generator=torch.Generator().manual_seed(5))

    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    enc = ref.model.encoder(input_ids=prompt[None], past_key_values=cache)
    no_sc = ref(past_key_values=cache, decoder_input_ids=canvas[None]).logits[0]
    with_sc = ref(past_key_values=cache, decoder_input_ids=canvas[None], self_conditioning_logits=sc_logits).logits[0]

    kv = ours.new_cache()
    hidden = ours.encode(kv, prompt)
    assert (hidden - enc.last_hidden_state[0]).abs().max() <= TOL
    for i, layer in enumerate(kv.layers):
        assert layer.keys.shape == cache.layers[i].keys[0].shape, f"layer {i} cache length"
        assert (layer.keys - cache.layers[i].keys[0]).abs().max() <= TOL
        assert (layer.values - cache.layers[i].values[0]).abs().max() <= TOL
    assert (ours.denoise(kv, canvas, None) - no_sc).abs().max() <= TOL
    soft = ours.soft_embedding(torch.softmax(sc_logits[0], dim=-1, dtype=torch.float32))
    assert (ours.denoise(kv, canvas, soft) - with_sc).abs().max() <= TOL
    assert kv.length == n  # the decoder never writes the cache


@pytest.mark.parametrize("name", SPEC_NAMES)
@torch.inference_mode()
def test_logits_after_committed_blocks_pass_the_window(ref_folders, name):
    """Teacher-forced: prompt + two committed blocks, so the context passes the sliding window."""
    from transformers import DynamicCache

    ref, ours = _pair(ref_folders, name)
    spec = SPECS[name]
    C = spec.canvas_length
    prompt = prompt_ids(5, spec.vocab_size, 1)
    blocks = [prompt_ids(C, spec.vocab_size, 10 + b) for b in range(2)]
    canvas = prompt_ids(C, spec.vocab_size, 7)
    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    kv = ours.new_cache()
    for chunk in [prompt, *blocks]:
        ref.model.encoder(input_ids=chunk[None], past_key_values=cache)
        ours.encode(kv, chunk)
    assert kv.length == 5 + 2 * C > spec.sliding_window
    expected = ref(past_key_values=cache, decoder_input_ids=canvas[None]).logits[0]
    assert (ours.denoise(kv, canvas, None) - expected).abs().max() <= TOL


@pytest.mark.parametrize("name", SPEC_NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_generate_is_token_exact_over_several_blocks(ref_folders, name, seed):
    folder = ref_folders(name)
    ref, ck = load_reference(folder), load_checkpoint(folder)
    spec = SPECS[name]
    prompt = prompt_ids(4 + 5 * seed, spec.vocab_size, seed).tolist()
    steps = 12
    expected, drafts = reference_generate(ref, prompt, seed, max_new_tokens=3 * spec.canvas_length,
                                          max_denoising_steps=steps)
    settings = SamplerSettings.from_defaults(ck.generation, max_new_tokens=3 * spec.canvas_length,
                                             max_denoising_steps=steps)
    got = generate(ck.model, prompt, settings, seed=seed)
    assert got.token_ids == expected
    assert len(got.token_ids) == 3 * spec.canvas_length
    assert got.decoder_passes == len(drafts)


def test_generate_takes_its_defaults_from_the_checkpoint(ref_folders, tmp_path):
    """generation_config.json's step limit and sampler knobs, not the library's defaults, on both sides."""
    folder = _with_generation_config(ref_folders("b"), tmp_path, max_denoising_steps=9, t_max=1.1,
                                     sampler_config={"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.5})
    ref, ck = load_reference(folder), load_checkpoint(folder)
    prompt = [5, 6, 7]
    expected, drafts = reference_generate(ref, prompt, seed=3, max_new_tokens=2 * SPECS["b"].canvas_length - 3)
    got = generate(ck.model, prompt, SamplerSettings.from_defaults(ck.generation, max_new_tokens=13), seed=3)
    assert got.token_ids == expected
    assert got.steps_per_block == [9, 9] and len(drafts) == 18  # random weights never stop early


def _with_generation_config(folder, tmp_path, **gen):
    target = tmp_path / "ckpt"
    shutil.copytree(folder, target)
    (target / "generation_config.json").write_text(json.dumps(gen))
    return target


def test_eos_inside_a_block_pads_the_rest_and_stops(ref_folders, tmp_path):
    spec = SPECS["a"]
    C = spec.canvas_length
    folder = ref_folders("a")
    prompt = [9, 8, 7, 6]
    free, _ = reference_generate(load_reference(folder), prompt, 0, max_new_tokens=3 * C, max_denoising_steps=8)
    # An EOS id that first appears at position 3 of the second block.
    eos = next(t for i, t in enumerate(free[C + 3:2 * C], start=C + 3) if t not in free[:i])
    stop_at = free.index(eos)
    folder_eos = _with_generation_config(folder, tmp_path, eos_token_id=[eos], pad_token_id=0,
                                         max_denoising_steps=8)
    ref, ck = load_reference(folder_eos), load_checkpoint(folder_eos)
    expected, _ = reference_generate(ref, prompt, 0, max_new_tokens=3 * C)
    got = generate(ck.model, prompt, SamplerSettings.from_defaults(ck.generation, max_new_tokens=3 * C), seed=0)
    assert got.token_ids == expected
    assert len(got.token_ids) == 2 * C and got.finish_reason == "eos"
    assert got.token_ids[stop_at] == eos and set(got.token_ids[stop_at + 1:]) == {0}
    assert got.token_ids[:stop_at] == free[:stop_at]


def test_block_stops_after_two_steps_when_stable_and_confident(ref_folders, tmp_path):
    folder = _with_generation_config(ref_folders("c", degenerate=True), tmp_path, confidence_threshold=1000.0)
    ref, ck = load_reference(folder), load_checkpoint(folder)
    C = SPECS["c"].canvas_length
    expected, drafts = reference_generate(ref, [4, 5, 6], 11, max_new_tokens=2 * C)
    got = generate(ck.model, [4, 5, 6], SamplerSettings.from_defaults(ck.generation, max_new_tokens=2 * C), seed=11)
    assert got.token_ids == expected
    assert got.steps_per_block == [2, 2] and len(drafts) == 4
    assert got.tokens_per_forward == pytest.approx(2 * C / 4)  # no pad id configured: every token counts
