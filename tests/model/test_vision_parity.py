"""The vision tower and image prompts against transformers 5.23.0 in float32 (spec "v" of tests/reference.py).

The reference's plain encoder forward drops the image block mask (MODEL_SPEC pitfall 8.1), so the cache is
compared with the masks built as its `generate` builds them; `generate` itself is compared token for token.
The tower's features differ from the reference's by float32 rounding (about 1e-6: it runs each image on its own
patches, the reference pads every image of a batch to the budget's patch count). Over 10 steps a block, one
near-tie accept decision of this spec flips on that at step 8, so the generate comparison runs 4 steps a block,
as MODEL_SPEC section 10 warns for long trajectories.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dgserve.model.generate import generate
from dgserve.model.loader import load_checkpoint
from dgserve.model.media import MediaProcessor
from dgserve.model.sampler import SamplerSettings
from dgserve.model.tiny import write_processor_configs
from dgserve.model.vision import as_patches
from tests.reference import SPECS, load_reference, reference_generate

TOL = 1e-4
SPEC = SPECS["v"]


def png(h: int, w: int, seed: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pair(ref_folders):
    folder = ref_folders("v")
    write_processor_configs(folder)
    return load_reference(folder), load_checkpoint(folder), MediaProcessor.from_checkpoint(folder)


def image_prompt(items, cfg, text_ids=(5, 6, 7)) -> list[int]:
    """bos, text, then each image as <boi> soft tokens <eoi>, then text."""
    ids = [2, *text_ids]
    for item in items:
        ids += [cfg.boi_token_id, *[cfg.image_token_id] * item.soft_tokens, cfg.eoi_token_id, 9]
    return ids + [10, 11]


def reference_inputs(proc, items, data, budget):
    """What the reference takes: the processor's padded patches, as its own pipeline gives them."""
    out = proc.processor(images=[Image.open(io.BytesIO(d)).convert("RGB") for d in data], max_soft_tokens=budget,
                         return_tensors="pt")
    assert [int(n) for n in out["num_soft_tokens_per_image"]] == [i.soft_tokens for i in items]
    return out["pixel_values"], out["image_position_ids"]


@torch.inference_mode()
def test_vision_features_match_for_images_of_several_sizes(pair):
    ref, ck, proc = pair
    data = [png(100, 150, 0), png(40, 160, 1), png(48, 48, 2)]
    items = [proc.image(d, f"images[{i}]", 70) for i, d in enumerate(data)]
    assert len({i.soft_tokens for i in items}) >= 2  # several grids, so packing and pooling are exercised
    pixels, positions = reference_inputs(proc, items, data, 70)
    for k, item in enumerate(items):  # the patches sent as 8-bit codes are the processor's values, bit for bit
        assert torch.equal(torch.from_numpy(item.values()), pixels[k][(positions[k] >= 0).all(-1)])
    expected = ref.model.encoder.get_image_features(pixels, positions).pooler_output
    got = torch.cat(ck.model.vision.encode([as_patches(i) for i in items]))
    assert got.shape == expected.shape == (sum(i.soft_tokens for i in items), SPEC.hidden_size)
    assert (got - expected).abs().max() <= TOL
    alone = ck.model.vision.encode([as_patches(items[1])])[0]  # an image's rows do not depend on its neighbours
    n0 = items[0].soft_tokens
    assert (alone - got[n0:n0 + items[1].soft_tokens]).abs().max() <= 1e-5


@torch.inference_mode()
def test_the_encoder_cache_of_an_image_prompt_matches_with_the_generate_mask(pair):
    from transformers import DynamicCache

    ref, ck, proc = pair
    data = [png(80, 120, 3), png(60, 60, 4)]
    items = [proc.image(d, f"images[{i}]", 70) for i, d in enumerate(data)]
    pixels, positions = reference_inputs(proc, items, data, 70)
    ids = torch.tensor([image_prompt(items, ck.config)])
    mm = (ids == ck.config.image_token_id).long()
    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    masks = ref.model.encoder.create_masks_for_generate(
        config=ref.config, inputs_embeds=torch.empty(1, ids.shape[1], 0), attention_mask=None,
        past_key_values=cache, position_ids=None, mm_token_type_ids=mm)
    enc = ref.model.encoder(input_ids=ids, pixel_values=pixels, image_position_ids=positions, attention_mask=masks,
                            past_key_values=cache)

    model = ck.model
    soft_rows = model.vision.encode([as_patches(i) for i in items])
    from dgserve.model.media import media_spans

    spans = media_spans(ids[0].tolist(), ck.config.media_token_ids)
    kv = model.new_cache()
    hidden = model.encode(kv, ids[0], chunk=16, media=spans, soft_rows=soft_rows)  # chunks end after a block
    assert (hidden - enc.last_hidden_state[0]).abs().max() <= TOL
    for i, layer in enumerate(kv.layers):
        assert layer.keys.shape == cache.layers[i].keys[0].shape, f"layer {i} cache length"
        assert (layer.keys - cache.layers[i].keys[0]).abs().max() <= TOL, f"layer {i} keys"
        assert (layer.values - cache.layers[i].values[0]).abs().max() <= TOL, f"layer {i} values"

    # The block mask matters here: without it (the reference's plain forward) the states differ.
    causal = model.new_cache()
    object.__setattr__(model.cfg, "vision_bidirectional", False)
    try:
        plain = model.encode(causal, ids[0], media=spans, soft_rows=soft_rows)
    finally:
        object.__setattr__(model.cfg, "vision_bidirectional", True)
    assert (plain - enc.last_hidden_state[0]).abs().max() > 1e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_generate_is_token_exact_with_images(pair, seed):
    ref, ck, proc = pair
    data = [png(90, 70, 10 + seed), png(50, 100, 20 + seed)][: 1 + seed]
    budget = 70 if seed == 0 else 140
    items = [proc.image(d, f"images[{i}]", budget) for i, d in enumerate(data)]
    pixels, positions = reference_inputs(proc, items, data, budget)
    prompt = image_prompt(items, ck.config)
    mm = (torch.tensor([prompt]) == ck.config.image_token_id).long()
    steps = 4  # see the module docstring: longer runs flip near-ties on 1e-6 rounding of the features
    expected, drafts = reference_generate(ref, prompt, seed, max_new_tokens=3 * SPEC.canvas_length,
                                          max_denoising_steps=steps, pixel_values=pixels,
                                          image_position_ids=positions, mm_token_type_ids=mm)
    settings = SamplerSettings.from_defaults(ck.generation, max_new_tokens=3 * SPEC.canvas_length,
                                             max_denoising_steps=steps)
    got = generate(ck.model, prompt, settings, seed=seed, media=items)
    assert got.token_ids == expected
    assert got.decoder_passes == len(drafts)
    # and the image counts: another image gives other tokens
    other = [proc.image(png(90, 70, 99), "images[0]", budget)] + items[1:]
    if other[0].soft_tokens == items[0].soft_tokens:
        assert generate(ck.model, prompt, settings, seed=seed, media=other).token_ids != expected
