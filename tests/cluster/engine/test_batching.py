"""Batching never changes results in float32; in bfloat16 it is compared by distribution (DESIGN: rules)."""

from __future__ import annotations

import pytest
import torch

from dgserve.cluster.engine import Engine, EngineConfig, EngineRequest
from dgserve.model.generate import generate
from dgserve.model.transformer import WorkItem

from .conftest import make_engine, settings, varied_requests


def solo(ck, req):
    return generate(ck.model, list(req.prompt_ids), req.settings, seed=req.seed)


def solo_tokens(ck, req) -> list[int]:
    return solo(ck, req).token_ids


def run_batched(ck, reqs, arrive_every: int = 0, **cfg):
    """Finished events of `reqs` through one engine, and the most canvases any iteration denoised together."""
    widest = [0]
    engine = Engine(ck.model, EngineConfig(**cfg),
                    on_step=lambda e, out, s: widest.__setitem__(0, max(widest[0], len(out.canvases))))
    streams = []
    for r in reqs:
        streams.append(engine.submit(r))
        for _ in range(arrive_every):
            engine.step()
    engine.run_until_idle()
    return [s.result(0) for s in streams], widest[0]


def assert_same_as_solo(ck, reqs, finals, early_stops: bool) -> None:
    """Tokens and steps per block bitwise those of each request alone. With `early_stops` (the confident model)
    the step counts also vary between requests and blocks stop before their step limit, so equal step counts mean
    something; the random model never stops early but its tokens turn on the last bit of every logit."""
    steps = []
    for r, f in zip(reqs, finals, strict=True):
        alone = solo(ck, r)
        assert list(f.token_ids) == alone.token_ids, r.request_id
        assert list(f.stats.steps_per_block) == alone.steps_per_block, r.request_id
        steps += [(n, r.settings.max_denoising_steps) for n in alone.steps_per_block]
    if early_stops:
        assert len({n for n, _ in steps}) >= 3 and any(n < limit for n, limit in steps), steps


MODELS = pytest.mark.parametrize("model", ["tiny", "confident"])


@MODELS
def test_eight_concurrent_requests_give_each_its_solo_tokens_and_steps(request, model):
    ck = request.getfixturevalue(model)
    reqs = varied_requests(ck, 8)
    finals, widest = run_batched(ck, reqs)
    assert_same_as_solo(ck, reqs, finals, early_stops=model == "confident")
    assert widest == 8  # they really ran together


@MODELS
def test_arrivals_at_different_times_do_not_change_tokens_or_steps(request, model):
    ck = request.getfixturevalue(model)
    reqs = varied_requests(ck, 6, seed=3)
    finals, widest = run_batched(ck, reqs, arrive_every=5, max_running=3)  # at most 3 run at once
    assert_same_as_solo(ck, reqs, finals, early_stops=model == "confident")
    assert widest == 3


def _teacher_forced(ck, exact: bool) -> float:
    """Max |batched - solo| over the logits of 5 canvases on 5 caches, with an encode item in the same pass."""
    model = ck.model
    g = torch.Generator().manual_seed(0)
    C, V = model.config.canvas_length, model.config.text.vocab_size
    prompts = [torch.randint(4, V, (n,), generator=g) for n in (1, 3, 17, 40, 70)]
    canvases = [torch.randint(0, V, (C,), generator=g) for _ in prompts]
    softs = [None, *(torch.randn(C, model.config.text.hidden_size, generator=g) for _ in prompts[1:])]
    extra = torch.randint(4, V, (2,), generator=g)

    def caches():
        out = []
        for p in prompts:
            c = model.new_cache()
            model.encode(c, p)
            out.append(c)
        return out

    solo = [model.denoise(c, x, s) for c, x, s in zip(caches(), canvases, softs, strict=True)]
    model.exact_batching = exact
    try:
        cs = caches()
        other = model.new_cache()
        items = [WorkItem(other, extra, encode=True)]
        items += [WorkItem(c, x, encode=False, soft_CD=s) for c, x, s in zip(cs, canvases, softs, strict=True)]
        with torch.inference_mode():
            h = model.forward(items)
        batched = [model.logits(h[2 + i * C: 2 + (i + 1) * C]) for i in range(len(prompts))]
    finally:
        model.exact_batching = True
    return max(float((a - b).abs().max()) for a, b in zip(solo, batched, strict=True))


def test_teacher_forced_batched_logits_match_solo(tiny, capsys):
    exact = _teacher_forced(tiny, exact=True)
    plain = _teacher_forced(tiny, exact=False)
    with capsys.disabled():
        print(f"\nteacher-forced max |batched - solo| logit: {exact:.2e} (engine), {plain:.2e} (plain batched GEMMs)")
    assert exact <= 1e-4
    assert exact == 0.0  # on CPU float32 the engine is bitwise batch-invariant (RowLayout)


@pytest.mark.slow  # ~25 s
def test_bfloat16_batched_against_solo_by_distribution(confident, confident_bf16, capsys):
    """bf16 batching is not bitwise (kernels round by batch shape); it must not move results further than bf16
    rounding itself does: the floor is how far solo bf16 runs are from solo float32 runs of the same requests."""
    reqs = varied_requests(confident_bf16, 8, seed=5)
    finals, _ = run_batched(confident_bf16, reqs)
    agree = {"batched": [], "floor": []}
    steps = {"batched": [], "solo": [], "float32": []}
    for r, f in zip(reqs, finals, strict=True):
        alone, exact = solo(confident_bf16, r), solo(confident, r)
        agree["batched"].append(agreement(f.token_ids, alone.token_ids))
        agree["floor"].append(agreement(alone.token_ids, exact.token_ids))
        for key, blocks in (("batched", f.stats.steps_per_block), ("solo", alone.steps_per_block),
                            ("float32", exact.steps_per_block)):
            steps[key].append(sum(blocks) / len(blocks))
    mean = {k: sum(v) / len(v) for k, v in agree.items()}
    mean_steps = {k: sum(v) / len(v) for k, v in steps.items()}
    with capsys.disabled():
        print(f"\nbf16, 8 requests: token agreement batched/solo {mean['batched']:.3f} (bf16/float32 floor "
              f"{mean['floor']:.3f}); mean steps per block batched {mean_steps['batched']:.2f}, solo "
              f"{mean_steps['solo']:.2f}, float32 {mean_steps['float32']:.2f}")
    assert mean["batched"] >= mean["floor"]
    assert abs(mean_steps["batched"] - mean_steps["solo"]) <= abs(mean_steps["solo"] - mean_steps["float32"]) + 0.5


def agreement(a, b) -> float:
    n = min(len(a), len(b))
    return sum(x == y for x, y in zip(a[:n], b[:n], strict=True)) / max(n, 1)


def test_one_request_alone_in_the_engine_matches_generate(tiny):
    r = varied_requests(tiny, 1, seed=9)[0]
    engine = make_engine(tiny)
    s = engine.submit(r)
    engine.run_until_idle()
    assert list(s.result(0).token_ids) == solo_tokens(tiny, r)


def test_batching_stays_exact_with_two_cpu_threads(tiny):
    before = torch.get_num_threads()
    try:
        engine = make_engine(tiny, cpu_threads=2)
        assert torch.get_num_threads() == 2
        reqs = varied_requests(tiny, 5, seed=11, max_len=20)
        streams = [engine.submit(r) for r in reqs]
        engine.run_until_idle()
        for r, s in zip(reqs, streams, strict=True):  # solo also at 2 threads
            assert list(s.result(0).token_ids) == solo_tokens(tiny, r), r.request_id
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow  # ~32 s; test_batching_stays_exact_with_two_cpu_threads runs in `make test`
def test_batching_stays_exact_with_128_experts_at_two_threads(ref_folders):
    """The real structure (tests/reference.py "real"): with 128 experts top-8 most (item, expert) groups are under
    the 2-thread small-M bound, so each must keep the row order it has when its item runs alone."""
    from dgserve.model.loader import load_checkpoint

    ck = load_checkpoint(ref_folders("real"))
    before = torch.get_num_threads()
    try:
        engine = make_engine(ck, cpu_threads=2, sampler_threads=1)
        s = settings(ck, max_new_tokens=2 * ck.model.config.canvas_length, max_denoising_steps=2)
        reqs = [EngineRequest(list(range(5, 5 + n)), s, seed=i, request_id=f"r{i}")
                for i, n in enumerate((1, 3, 20, 300))]
        streams = [engine.submit(r) for r in reqs]
        engine.run_until_idle()
        for r, st in zip(reqs, streams, strict=True):  # solo also at 2 threads
            assert list(st.result(0).token_ids) == solo_tokens(ck, r), r.request_id
    finally:
        torch.set_num_threads(before)
