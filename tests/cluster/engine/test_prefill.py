"""Chunked prefill: long prompts in chunks that batch with other work (MODEL_SPEC 3.9 for the cache)."""

from __future__ import annotations

import time

import pytest
import torch

from dgserve.cluster.engine import EngineRequest
from dgserve.model.cache import kv_bytes
from dgserve.model.loader import load_checkpoint
from dgserve.model.transformer import WorkItem

from .conftest import make_engine, settings


def spec_cache_bytes(cfg, positions: int, page: int) -> int:
    """MODEL_SPEC 3.9: 2 (K, V) x kv heads x head_dim x bytes per position; sliding layers hold at most W-1."""
    total = 0
    for s in cfg.layers:
        held = min(positions, cfg.sliding_window - 1) if s.is_sliding else -(-positions // page) * page
        total += 2 * s.num_kv_heads * s.head_dim * 4 * held
    return total


@pytest.mark.slow  # ~50 s
def test_32k_prompt_prefills_in_chunks_and_the_cache_has_the_spec_size(tiny):
    cfg = tiny.config
    C = cfg.canvas_length
    assert cfg.text.max_position_embeddings >= 32768
    prompt = torch.randint(4, 900, (32768 - C,), generator=torch.Generator().manual_seed(0)).tolist()
    engine = make_engine(tiny, prefill_chunk=2048, max_prefill_tokens=4096)
    short = engine.submit(EngineRequest([5, 6, 7], settings(tiny, max_new_tokens=2 * C, max_denoising_steps=6),
                                        seed=1))
    long = engine.submit(EngineRequest(prompt, settings(tiny, max_new_tokens=C, max_denoising_steps=4), seed=0))
    t0 = time.perf_counter()
    peak = 0
    while not engine.idle:
        out = engine.step()
        slot = engine.executor.slots.get(1)
        if slot is not None and slot.cache is not None:
            peak = max(peak, slot.cache.length)
            held = slot.cache.nbytes()
            assert held == spec_cache_bytes(cfg.text, slot.cache.length, engine.sizes.page_size)
            for layer, spec in zip(slot.cache.layers, cfg.text.layers, strict=True):
                assert layer.length == (min(slot.cache.length, cfg.text.sliding_window - 1) if spec.is_sliding
                                        else slot.cache.length)
        assert out is None or out.rows.get("prefill", 0) <= 4096
    elapsed = time.perf_counter() - t0
    assert elapsed < 60, f"32K prefill took {elapsed:.1f}s"
    assert peak == len(prompt)  # the whole prompt was cached; the last block is never encoded
    assert len(long.result(0).token_ids) == C and len(short.result(0).token_ids) == 2 * C
    # The short request was not held up behind the long prompt: it shared the prefill iterations.
    assert short.result(0).stats.time_to_first_block_s < long.result(0).stats.time_to_first_block_s


def _chunked_vs_whole(model, prompt, canvas, chunks, reference=None):
    """Max |logits| difference of chunked prefills (each chunk batched with another request's prompt) against
    one unchunked prefill (or `reference` logits), and the caches' key difference."""
    whole = model.new_cache()
    model.encode(whole, prompt, chunk=len(prompt))
    ref = model.denoise(whole, canvas, None) if reference is None else reference
    worst_logits = worst_keys = 0.0
    for chunk in chunks:
        cache = model.new_cache()
        with torch.inference_mode():
            for s in range(0, len(prompt), chunk):
                model.forward([WorkItem(model.new_cache(), prompt[:5], encode=True),
                               WorkItem(cache, prompt[s:s + chunk], encode=True)])
        got = model.denoise(cache, canvas, None)
        worst_logits = max(worst_logits, float((got.double() - ref.double()).abs().max()))
        for a, b in zip(cache.layers, whole.layers, strict=True):
            assert a.length == b.length
            worst_keys = max(worst_keys, float((a.keys.double() - b.keys.double()).abs().max()))
    return worst_logits, worst_keys, ref


def test_chunked_prefill_equals_unchunked_at_three_windows(tiny_dir, tiny, capsys):
    W, C = tiny.config.text.sliding_window, tiny.config.canvas_length
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(4, 900, (3 * W,), generator=g)
    canvas = torch.randint(0, 1024, (C,), generator=g)
    chunks = (1, 7, W - 1, W, 40)
    # float64 isolates the logic (masks, positions, sliding windows, cache writes) from float32 rounding.
    f64 = load_checkpoint(tiny_dir, dtype="float64").model
    logits64, keys64, truth = _chunked_vs_whole(f64, prompt, canvas, chunks)
    assert logits64 <= 1e-4 and keys64 <= 1e-4
    # float32: chunking adds no error beyond float32's own. The random tiny model amplifies rounding (its
    # unchunked float32 logits are ~2e-3 from float64), so the bound is relative to that.
    own = float((tiny.model.denoise(_whole(tiny.model, prompt), canvas, None).double() - truth).abs().max())
    logits32, _, _ = _chunked_vs_whole(tiny.model, prompt, canvas, chunks, reference=truth)
    with capsys.disabled():
        print(f"\nchunked vs unchunked prefill at 3W: float64 max|dlogit| {logits64:.1e}; float32 chunked "
              f"{logits32:.1e} vs unchunked {own:.1e} from the float64 logits")
    assert logits32 <= 2 * own + 1e-4


def _whole(model, prompt):
    cache = model.new_cache()
    model.encode(cache, prompt, chunk=len(prompt))
    return cache


def test_kv_bytes_formula_matches_the_cache(tiny):
    model = tiny.model
    for page in (7, 32, 256):
        cache = model.new_cache(page)
        for n in (1, 5, 31, 32, 33, 100):
            model.encode(cache, torch.arange(4, 4 + n))
            assert cache.nbytes() == kv_bytes(tiny.config.text, cache.length, torch.float32, page)
