"""The split in local processes (no Ray): A attention + E expert ranks give every request exactly the tokens of
single-process `generate`, alone and batched, and teacher-forced passes exactly its logits (float32, CPU)."""

from __future__ import annotations

import pytest
import torch

from dgserve.cluster.experts.local import ForcedCase, SplitRequest, run_split
from dgserve.model.generate import generate
from dgserve.model.settings import SamplerSettings

REQUESTS = [SplitRequest((5, 6, 7, 8), {"max_new_tokens": 64, "max_denoising_steps": 4}, seed=1),
            SplitRequest(tuple(range(10, 50)), {"max_new_tokens": 32, "max_denoising_steps": 6, "t_max": 1.0}, seed=2),
            SplitRequest((9,), {"max_new_tokens": 96, "max_denoising_steps": 3}, seed=3)]


def forced_cases(tiny, n: int = 3) -> tuple[ForcedCase, ...]:
    g = torch.Generator().manual_seed(7)
    C, V = tiny.config.canvas_length, tiny.config.text.vocab_size
    return tuple(ForcedCase(tuple(torch.randint(4, V, (p,), generator=g).tolist()),
                            tuple(torch.randint(0, V, (C,), generator=g).tolist())) for p in (1, 17, 40)[:n])


def solo_logits(tiny, case: ForcedCase) -> torch.Tensor:
    cache = tiny.model.new_cache()
    with torch.inference_mode():
        tiny.model.encode(cache, torch.tensor(case.prompt_ids))
    return tiny.model.denoise(cache, torch.tensor(case.canvas_ids), None)


@pytest.mark.parametrize(("attention", "experts"), [(1, 1), (1, 2), (1, 4), (2, 2)],
                         ids=["1+1", "1+2", "1+4", "2+2"])
def test_the_split_gives_single_process_tokens_alone_and_batched_and_its_logits(tiny, tiny_dir, attention, experts):
    cases = forced_cases(tiny)
    run = run_split(tiny_dir, REQUESTS, attention, experts, alone=True, forced=cases)
    for r, batched, alone in zip(REQUESTS, run.batched, run.alone, strict=True):
        s = SamplerSettings.from_defaults(tiny.generation, **r.sampler)
        want = generate(tiny.model, list(r.prompt_ids), s, seed=r.seed)
        for got in (alone, batched):
            assert list(got.token_ids) == want.token_ids, (attention, experts, r)
            assert list(got.steps_per_block) == want.steps_per_block
        # each prompt ran alone first: in the batch, it starts from its cached prompt, on the rank that holds it
        assert (alone.cached_tokens, batched.cached_tokens) == (0, len(r.prompt_ids))
    for case, got in zip(cases, run.logits, strict=True):
        want = solo_logits(tiny, case)
        assert got.shape == want.shape and torch.equal(got, want), (attention, experts, (got - want).abs().max())


def test_a_fixed_capacity_exchange_serves_the_same_requests(confident, confident_dir):
    """engine.expert_exchange = fixed: padded splits sized from the plan's row bound. Bitwise only for row-invariant
    (item, expert) groups (tests/cluster/experts/test_exchange.py), so logits are compared to a float32 tolerance
    and tokens on the model with a planted copy path (random weights turn last-bit differences into other draws)."""
    cases = forced_cases(confident)
    run = run_split(confident_dir, REQUESTS, 1, 2, engine={"expert_exchange": "fixed"}, forced=cases)
    C = confident.config.canvas_length
    assert run.capacities and all(c // C in (1, 2, 4, 8, 16) and c % C == 0 for c in run.capacities), run.capacities
    for case, got in zip(cases, run.logits, strict=True):
        torch.testing.assert_close(got, solo_logits(confident, case), rtol=1e-5, atol=1e-5)
    same = total = 0
    for r, got in zip(REQUESTS, run.batched, strict=True):
        want = generate(confident.model, list(r.prompt_ids),
                        SamplerSettings.from_defaults(confident.generation, **r.sampler), seed=r.seed)
        assert len(got.token_ids) == len(want.token_ids)
        same += sum(a == b for a, b in zip(got.token_ids, want.token_ids, strict=True))
        total += len(want.token_ids)
    assert same / total >= 0.95, f"{same} of {total} tokens agree"


def test_expert_ranks_hold_fp8_experts_and_give_single_process_fp8_results(tiny_dir):
    """experts_dtype fp8 with expert ranks: each expert rank quantizes only its own experts at load, and the split
    gives the single-process FP8 model's logits and tokens."""
    from dgserve.model.loader import load_checkpoint

    fp8 = load_checkpoint(tiny_dir, experts_dtype="fp8")
    cases = forced_cases(fp8, 2)
    run = run_split(tiny_dir, REQUESTS[:2], 1, 2, forced=cases, experts_dtype="fp8")
    for case, got in zip(cases, run.logits, strict=True):
        want = solo_logits(fp8, case)
        assert torch.equal(got, want), (got - want).abs().max()
    for r, got in zip(REQUESTS[:2], run.batched, strict=True):
        s = SamplerSettings.from_defaults(fp8.generation, **r.sampler)
        assert list(got.token_ids) == generate(fp8.model, list(r.prompt_ids), s, seed=r.seed).token_ids
