"""Parity with transformers 5.23.0 on the real checkpoint's structure at small width (tests/reference.py "real"):
16 heads of 256, 8 KV heads on sliding layers, 2 KV heads of 512 with proportional RoPE on the full layer, window
1024, canvas 256, 128 experts top-8, prompts shorter and longer than the window.

Bitwise, at one and at two torch threads. With two threads a GEMM of fewer than 12 rows computes a row
differently depending on its place among the rows, and with 128 experts many (token, expert) groups are that
small: the experts must order each group's rows exactly as the reference's sort does (model/moe.py).
"""

from __future__ import annotations

import pytest
import torch

from dgserve.model.generate import generate
from dgserve.model.loader import load_checkpoint
from dgserve.model.sampler import SamplerSettings
from tests.model.test_parity import prompt_ids
from tests.reference import SPECS, load_reference, reference_generate

SPEC = SPECS["real"]
W, C, V = SPEC.sliding_window, SPEC.canvas_length, SPEC.vocab_size

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(ref_folders):
    folder = ref_folders("real")
    return folder, load_reference(folder), load_checkpoint(folder)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _same(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, what
    assert torch.equal(ours, ref), f"{what}: max |diff| {float((ours - ref).abs().max()):.3e}"


# Each thread count and each side of the window once (the four crossings cost 40 s more on 2 cores).
@pytest.mark.parametrize(("threads", "n"), [(1, W + 77), (2, W - 3)], ids=["1-thread-past-window",
                                                                          "2-threads-inside-window"],
                         indirect=["threads"])
@torch.inference_mode()
def test_encoder_cache_and_decoder_logits_are_bitwise(pair, threads, n):
    from transformers import DynamicCache

    _, ref, ck = pair
    ours = ck.model
    prompt = prompt_ids(n, V, seed=n)
    canvas = prompt_ids(C, V, seed=99)
    sc_logits = torch.randn(1, C, V, generator=torch.Generator().manual_seed(5))

    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    enc = ref.model.encoder(input_ids=prompt[None], past_key_values=cache)
    no_sc = ref(past_key_values=cache, decoder_input_ids=canvas[None]).logits[0]
    with_sc = ref(past_key_values=cache, decoder_input_ids=canvas[None], self_conditioning_logits=sc_logits).logits[0]

    kv = ours.new_cache()
    _same(ours.encode(kv, prompt), enc.last_hidden_state[0], "encoder output")
    for i, layer in enumerate(kv.layers):
        _same(layer.keys, cache.layers[i].keys[0], f"layer {i} keys")
        _same(layer.values, cache.layers[i].values[0], f"layer {i} values")
    _same(ours.denoise(kv, canvas, None), no_sc, "decoder logits")
    soft = ours.soft_embedding(torch.softmax(sc_logits[0], dim=-1, dtype=torch.float32))
    _same(ours.denoise(kv, canvas, soft), with_sc, "decoder logits with self-conditioning")


@torch.inference_mode()
def test_logits_after_committed_blocks_past_the_window_are_bitwise(pair):
    from transformers import DynamicCache

    _, ref, ck = pair
    torch.set_num_threads(2)
    try:
        cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
        kv = ck.model.new_cache()
        for chunk in [prompt_ids(600, V, 1), *(prompt_ids(C, V, 10 + b) for b in range(2))]:
            ref.model.encoder(input_ids=chunk[None], past_key_values=cache)
            ck.model.encode(kv, chunk)
        assert kv.length == 600 + 2 * C > W
        canvas = prompt_ids(C, V, 7)
        _same(ck.model.denoise(kv, canvas, None), ref(past_key_values=cache, decoder_input_ids=canvas[None]).logits[0],
              "decoder logits")
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize(("seed", "n", "blocks"), [(0, 5, 2), (1, 300, 2), (2, W + 100, 1)])
def test_generate_is_token_exact_at_two_threads(pair, seed, n, blocks):
    _, ref, ck = pair
    prompt = prompt_ids(n, V, seed).tolist()
    torch.set_num_threads(2)
    try:
        expected, drafts = reference_generate(ref, prompt, seed, max_new_tokens=blocks * C, max_denoising_steps=6)
        settings = SamplerSettings.from_defaults(ck.generation, max_new_tokens=blocks * C, max_denoising_steps=6)
        got = generate(ck.model, prompt, settings, seed=seed)
    finally:
        torch.set_num_threads(1)
    assert got.token_ids == expected
    assert got.decoder_passes == len(drafts)


@torch.inference_mode()
def test_bfloat16_teacher_forced_logits_are_as_close_to_the_reference_as_bf16_itself(pair, capsys):
    """Both sides in bfloat16 (the real checkpoint's dtype): our logits are no farther from transformers' bf16
    logits than those are from its float32 logits, with and without self-conditioning (the embed scale cast to
    bf16, the self-conditioning softmax rounded to bf16, the router and the expert combine in bf16)."""
    from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

    folder, ref32, _ = pair
    ref16 = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=torch.bfloat16,
                                                            attn_implementation="sdpa").eval()
    ours = load_checkpoint(folder, dtype="bfloat16").model
    prompt, canvas = prompt_ids(W + 77, V, seed=7), prompt_ids(C, V, seed=98)
    sc = torch.randn(1, C, V, generator=torch.Generator().manual_seed(6))

    def reference(ref, dtype):
        cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
        ref.model.encoder(input_ids=prompt[None], past_key_values=cache)
        plain = ref(past_key_values=cache, decoder_input_ids=canvas[None]).logits[0].float()
        cond = ref(past_key_values=cache, decoder_input_ids=canvas[None],
                   self_conditioning_logits=sc.to(dtype)).logits[0].float()
        return plain, cond

    r16, r32 = reference(ref16, torch.bfloat16), reference(ref32, torch.float32)
    kv = ours.new_cache()
    ours.encode(kv, prompt)
    soft = ours.soft_embedding(torch.softmax(sc[0].to(torch.bfloat16), dim=-1, dtype=torch.float32))
    mine = ours.denoise(kv, canvas, None).float(), ours.denoise(kv, canvas, soft).float()
    lines = []
    for what, m, a, b in zip(("no self-conditioning", "self-conditioning"), mine, r16, r32, strict=True):
        ours_err, floor = float((m - a).abs().max()), float((a - b).abs().max())
        lines.append(f"{what}: max |ours - ref bf16| {ours_err:.3e}, max |ref bf16 - ref fp32| {floor:.3e}, "
                     f"argmax agreement {float((m.argmax(-1) == a.argmax(-1)).float().mean()):.3f}")
        assert ours_err <= floor, lines[-1]
    with capsys.disabled():
        print("\nbf16 teacher-forced: " + "; ".join(lines))
