"""Admission by bytes, a bounded queue, and preemption when a generation grows past the budget."""

from __future__ import annotations

import pytest

from dgserve.cluster.engine import EngineRequest
from dgserve.cluster.engine.budget import PREFIX
from dgserve.cluster.engine.errors import Code, ResourceExhausted, TooLarge
from dgserve.model.generate import generate

from .conftest import held_by_requests, make_engine, settings


def prompts(n: int, length: int) -> list[list[int]]:
    return [[4 + (7 * i + j) % 800 for j in range(length)] for i in range(n)]


def run_checked(engine) -> int:
    """Run to the end, checking the accounting every iteration; returns the peak bytes reserved."""
    peak = 0
    while not engine.idle:
        engine.step()
        used = engine.budget.used
        assert used <= engine.budget.capacity
        canvases = len(engine.executor.slots)
        assert engine.executor.kv_bytes() + canvases * engine.sizes.canvas_bytes <= used
        peak = max(peak, used)
    return peak


def test_a_request_that_can_never_fit_is_refused_naming_the_budget_and_not_retriable(tiny):
    engine = make_engine(tiny, memory_budget_bytes=300_000, max_running=1)
    with pytest.raises(TooLarge, match="memory_budget_bytes=300000") as e:
        engine.submit(EngineRequest(prompts(1, 400)[0], settings(tiny, max_new_tokens=32)))
    assert e.value.code is Code.OUT_OF_RANGE and "can never fit" in str(e.value) and not e.value.retriable
    assert engine.metrics.rejections["over_budget"] == 1
    ok = engine.submit(EngineRequest([5, 6, 7], settings(tiny, max_new_tokens=32, max_denoising_steps=4)))
    engine.run_until_idle()  # the engine keeps serving
    assert len(ok.result(0).token_ids) == 32


def test_a_full_queue_refuses_with_an_error_saying_so(tiny):
    engine = make_engine(tiny, max_queued=2)
    s = settings(tiny, max_new_tokens=32, max_denoising_steps=4)
    first = [engine.submit(EngineRequest([5, 6], s)) for _ in range(2)]
    with pytest.raises(ResourceExhausted, match=r"queue full: 2 requests are waiting \(max_queued=2\)"):
        engine.submit(EngineRequest([5, 6], s))
    engine.run_until_idle()
    assert all(len(f.result(0).token_ids) == 32 for f in first)


def test_admission_waits_for_bytes_not_only_for_count(tiny):
    s = settings(tiny, max_new_tokens=64, max_denoising_steps=6)
    probe = make_engine(tiny, max_running=4)
    budget = probe.driver.max_bytes(40, s)  # the least that admits such a request: room for 3 prompts, not 4
    engine = make_engine(tiny, max_running=4, memory_budget_bytes=budget)
    reqs = [EngineRequest(p, s, seed=i) for i, p in enumerate(prompts(4, 40))]
    streams = [engine.submit(r) for r in reqs]
    engine.step()
    assert len(engine.driver.running) < 4 and engine.driver.waiting  # count allows 4; bytes do not
    run_checked(engine)
    for r, st in zip(reqs, streams, strict=True):
        assert list(st.result(0).token_ids) == generate(tiny.model, list(r.prompt_ids), s, seed=r.seed).token_ids
    assert held_by_requests(engine) == 0 and not engine.executor.slots
    assert engine.executor.kv_bytes() == engine.budget.held(PREFIX)  # what is left: the cached prefixes, exactly


def test_growth_past_the_budget_pauses_the_newest_and_recomputes_it_exactly(tiny):
    s = settings(tiny, max_new_tokens=96, max_denoising_steps=5)
    probe = make_engine(tiny, max_running=3)
    # All three fit at admission; their caches cannot all grow to three blocks.
    budget = 3 * probe.sizes.request(40) + probe.sizes.kv(1)
    assert budget >= probe.driver.max_bytes(40, s)
    engine = make_engine(tiny, max_running=3, memory_budget_bytes=budget)
    reqs = [EngineRequest(p, s, seed=10 + i) for i, p in enumerate(prompts(3, 40))]
    streams = [engine.submit(r) for r in reqs]
    run_checked(engine)
    stats = [st.result(0).stats for st in streams]
    assert sum(x.preemptions for x in stats) >= 1
    assert stats[0].preemptions == 0  # the oldest is never the one paused while newer ones run
    for r, st in zip(reqs, streams, strict=True):  # replaying the encode passes recomputes the same cache
        assert list(st.result(0).token_ids) == generate(tiny.model, list(r.prompt_ids), s, seed=r.seed).token_ids
    assert held_by_requests(engine) == 0 and engine.executor.kv_bytes() == engine.budget.held(PREFIX)


def test_a_request_paused_late_replays_its_context_within_the_step_cap(tiny):
    """Replayed encode passes count against max_prefill_tokens: a request paused after several blocks recomputes
    its cache over several iterations, each within EngineConfig.max_step_rows, with its tokens unchanged."""
    C = tiny.config.canvas_length
    s = settings(tiny, max_new_tokens=10 * C, max_denoising_steps=2, eos_token_ids=())  # no early end
    cfg = {"max_running": 2, "prefill_chunk": C, "max_prefill_tokens": C}
    probe = make_engine(tiny, **cfg)
    budget = probe.driver.max_bytes(40, s)  # both grow together; past 3 blocks the newer one is paused
    rows, engine = [], make_engine(tiny, memory_budget_bytes=budget, **cfg)
    engine.on_step = lambda e, out, step_s: rows.append(dict(out.rows))
    reqs = [EngineRequest(p, s, seed=20 + i) for i, p in enumerate(prompts(2, 40))]
    streams = [engine.submit(r) for r in reqs]
    run_checked(engine)
    assert streams[1].result(0).stats.preemptions >= 1
    cap = engine.config.max_step_rows(C)
    assert max(sum(r.values()) for r in rows) <= cap, (cap, max(rows, key=lambda r: sum(r.values())))
    assert max(r["commit"] + r["prefill"] for r in rows) <= C + cfg["max_running"] * C
    # Unchanged against the same engine that never pauses (the same prompt chunks: a 40-token prompt in chunks
    # of 32 is not bitwise one 40-row pass on CPUs whose GEMMs of under 4 rows round differently, as this one's)
    unpaused = make_engine(tiny, **cfg)
    expected = [unpaused.submit(r) for r in reqs]
    run_checked(unpaused)
    assert unpaused.metrics.preemptions == 0
    for st, ex in zip(streams, expected, strict=True):
        assert list(st.result(0).token_ids) == list(ex.result(0).token_ids)
