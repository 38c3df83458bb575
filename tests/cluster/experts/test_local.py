"""The split in local processes (no Ray): A attention + E expert ranks give every request of a batch exactly the
tokens of single-process `generate` (float32, CPU)."""

from __future__ import annotations

import pytest

from dgserve.cluster.experts.local import SplitRequest, generate_split
from dgserve.model.generate import generate
from dgserve.model.settings import SamplerSettings

REQUESTS = [SplitRequest((5, 6, 7, 8), {"max_new_tokens": 64, "max_denoising_steps": 4}, seed=1),
            SplitRequest(tuple(range(10, 50)), {"max_new_tokens": 32, "max_denoising_steps": 6, "t_max": 1.0}, seed=2),
            SplitRequest((9,), {"max_new_tokens": 96, "max_denoising_steps": 3}, seed=3)]


@pytest.mark.parametrize(("attention", "experts"), [(2, 2)], ids=["2+2"])  # 1+2 and 2+1: tests/cluster/test_cli.py
def test_the_split_gives_single_process_tokens_alone_and_batched(tiny, tiny_dir, attention, experts):
    got = generate_split(tiny_dir, REQUESTS, attention, experts)
    for r, res in zip(REQUESTS, got, strict=True):
        s = SamplerSettings.from_defaults(tiny.generation, **r.sampler)
        alone = generate(tiny.model, list(r.prompt_ids), s, seed=r.seed)
        assert list(res.token_ids) == alone.token_ids, (attention, experts, r)
        assert list(res.steps_per_block) == alone.steps_per_block
