"""engine.sampler = fused on CPU (the torch path of kernels/vocab): requests run to the end with the fused pass's
draws, by the same distribution as the exact sampler, and a canvas reserves no [C, V] workspace."""

from __future__ import annotations

import dataclasses

import torch

from dgserve.cluster.engine import EngineConfig
from dgserve.cluster.engine.budget import MemorySizes

from .conftest import varied_requests
from .test_batching import agreement, run_batched


def test_the_fused_sampler_runs_requests_to_the_end_with_its_own_draws(confident, capsys):
    """Every request ends with whole blocks and bounded steps. The draws differ from the exact sampler's after each
    block's first canvas (which both draw the same way), so tokens are compared with a floor: the exact sampler
    against itself under other seeds. The per-step distribution is tested in tests/kernels and
    tests/model/test_sampler.py."""
    reqs = varied_requests(confident, 8, seed=9)
    fused, _ = run_batched(confident, reqs, max_running=8, sampler="fused")
    exact, _ = run_batched(confident, reqs, max_running=8, sampler="exact")
    other, _ = run_batched(confident, [dataclasses.replace(r, seed=r.seed + 1) for r in reqs], max_running=8,
                           sampler="exact")
    agree = [agreement(f.token_ids, e.token_ids) for f, e in zip(fused, exact, strict=True)]
    floor = [agreement(o.token_ids, e.token_ids) for o, e in zip(other, exact, strict=True)]
    C = confident.config.canvas_length
    for r, f in zip(reqs, fused, strict=True):
        assert len(f.token_ids) % C == 0 and len(f.token_ids) <= -(-r.settings.max_new_tokens // C) * C
        assert all(1 <= n <= r.settings.max_denoising_steps for n in f.stats.steps_per_block)
    mean = {k: sum(v) / len(v) for k, v in (("fused", agree), ("floor", floor))}
    with capsys.disabled():
        print(f"\nfused vs exact sampler, 8 requests: token agreement {mean['fused']:.3f} (exact vs exact under "
              f"other seeds: {mean['floor']:.3f})")
    assert mean["floor"] < mean["fused"] < 1  # the same first canvases, then draws of its own


def test_a_fused_canvas_reserves_its_embedding_and_the_pass_scratch_not_the_vocabulary(tiny):
    """On the real shapes (canvas 256, vocabulary 262,144, hidden 2816, bfloat16): the exact sampler reserves the
    [C, V] float32 noise (268 MB) per canvas; the fused one its [C, D] embedding, small vectors and the pass's
    scratch for its rows, under 16 MB in all, on CUDA (the Triton kernel) and on CPU (the chunked torch path)."""
    cfg = tiny.model.config
    real = dataclasses.replace(cfg, canvas_length=256, text=dataclasses.replace(cfg.text, vocab_size=262_144,
                                                                                hidden_size=2816))
    C, V, D = 256, 262_144, 2816
    assert MemorySizes(real, torch.bfloat16, C).canvas_bytes >= C * V * 4
    for device in ("cuda", "cpu"):
        fused = MemorySizes(real, torch.bfloat16, C, fused=True, device=device).canvas_bytes
        assert C * D * 2 < fused <= 16 * 2**20, (device, fused)
    assert EngineConfig(sampler="auto").fused_sampler("cuda") and not EngineConfig().fused_sampler("cpu")
    assert EngineConfig(sampler="fused").fused_sampler("cpu") and not EngineConfig(sampler="exact").fused_sampler(
        "cuda")
