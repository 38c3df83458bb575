"""Failure isolation (failures.py): each failure class fails what it owns and nothing more, and the watchdog
watches progress, not wall time. Every injected failure hits one request of a batch; every other request of
that batch must end with exactly its solo tokens (same rows, same RNG draws)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from dgserve.cluster.engine import Engine, EngineConfig, EngineRequest, Failed, Finished
from dgserve.cluster.engine.errors import Code, UnitFailure
from dgserve.cluster.engine.executor import Executor
from dgserve.model.generate import generate
from dgserve.model.transformer import DiffusionGemma

from .conftest import held_by_requests, settings, varied_requests


def solo_tokens(ck, req) -> list[int]:
    return generate(ck.model, list(req.prompt_ids), req.settings, seed=req.seed).token_ids


def run(ck, reqs, **cfg) -> tuple[list, list]:
    """(final events, outcomes of every iteration) of `reqs` submitted together."""
    outcomes = []
    engine = Engine(ck.model, EngineConfig(**cfg), on_step=lambda e, out, s: outcomes.append(out))
    streams = [engine.submit(r) for r in reqs]
    engine.run_until_idle()
    assert held_by_requests(engine) == 0 and not engine.executor.slots and engine.healthy
    return [s.final for s in streams], outcomes


def assert_only_victim_failed(ck, reqs, finals, victim: int, code: Code) -> Failed:
    for i, (r, f) in enumerate(zip(reqs, finals, strict=True)):
        if i != victim:
            assert isinstance(f, Finished), (r.request_id, f)
            assert list(f.token_ids) == solo_tokens(ck, r), r.request_id
    failed = finals[victim]
    assert isinstance(failed, Failed) and failed.code is code, failed
    assert reqs[victim].request_id in failed.message
    return failed


def test_a_request_whose_sampling_step_raises_fails_alone(tiny, monkeypatch):
    """Class 1, a request's own bad state: its sampling step raises on its third step."""
    reqs = varied_requests(tiny, 4, seed=3)
    victim, steps = 1, {}
    real = Executor._step

    def step(self, rid, logits):
        steps[rid] = steps.get(rid, 0) + 1
        if self.slots[rid].admit.seed == reqs[victim].seed and steps[rid] == 3:
            raise RuntimeError("corrupt sampler state")
        return real(self, rid, logits)

    monkeypatch.setattr(Executor, "_step", step)
    finals, _ = run(tiny, reqs)
    failed = assert_only_victim_failed(tiny, reqs, finals, victim, Code.INTERNAL)
    assert "corrupt sampler state" in failed.message and "sampling" in failed.message


def test_an_allocation_that_fails_for_one_request_fails_it_alone_as_retriable(tiny, monkeypatch):
    """Class 2: the second cache allocation of the batch runs out of memory."""
    reqs = varied_requests(tiny, 4, seed=5)
    calls = [0]
    real = DiffusionGemma.new_cache

    def new_cache(self, *a):
        calls[0] += 1
        if calls[0] == 2:
            raise torch.OutOfMemoryError("cannot allocate the cache")
        return real(self, *a)

    monkeypatch.setattr(DiffusionGemma, "new_cache", new_cache)
    finals, _ = run(tiny, reqs)
    failed = [i for i, f in enumerate(finals) if isinstance(f, Failed)]
    assert len(failed) == 1, finals
    f = assert_only_victim_failed(tiny, reqs, finals, failed[0], Code.RESOURCE_EXHAUSTED)
    assert "out of memory" in f.message and f.retriable


def test_an_out_of_memory_packed_pass_is_split_and_every_request_keeps_its_tokens(tiny, monkeypatch):
    """Class 3a: the whole batch does not fit (more than 2 canvases in one pass): it fails half-way, at layer 3,
    after layers 0-2 wrote their KV; every cache is rolled back, the pass is split, nobody fails."""
    reqs = varied_requests(tiny, 6, seed=7)
    real = DiffusionGemma._layer

    def _layer(self, i, lw, h, rope, items, *a):
        if i == 3 and sum(not it.encode for it in items) > 2:
            raise torch.OutOfMemoryError("the packed pass does not fit")
        return real(self, i, lw, h, rope, items, *a)

    monkeypatch.setattr(DiffusionGemma, "_layer", _layer)
    finals, outcomes = run(tiny, reqs)
    for r, f in zip(reqs, finals, strict=True):
        assert isinstance(f, Finished) and list(f.token_ids) == solo_tokens(tiny, r), r.request_id
    assert max(o.passes for o in outcomes) >= 3  # six canvases ran as passes of at most two
    assert max(len(o.canvases) for o in outcomes) == 6  # ... in one iteration


def test_a_request_whose_rows_break_the_packed_pass_fails_alone(tiny, monkeypatch):
    """Class 3b: any pass holding one request's rows raises; the split finds it and the rest run unchanged."""
    reqs = varied_requests(tiny, 5, seed=9)
    victim = 3
    poison = reqs[victim].prompt_ids[0]
    assert all(r.prompt_ids[0] != poison for i, r in enumerate(reqs) if i != victim)
    real = DiffusionGemma.forward

    def forward(self, items, *a):
        if any(it.encode and int(it.ids[0]) == poison and it.cache.length == 0 for it in items):
            raise ValueError("a NaN in these rows")
        return real(self, items, *a)

    monkeypatch.setattr(DiffusionGemma, "forward", forward)
    finals, _ = run(tiny, reqs)
    failed = assert_only_victim_failed(tiny, reqs, finals, victim, Code.INTERNAL)
    assert "NaN" in failed.message and "forward" in failed.message


def test_a_rank_that_dies_fails_the_unit(tiny):
    """Class 4: a UnitFailure (a dead rank, a broken collective) fails every request as retriable."""
    reqs = varied_requests(tiny, 3, seed=11)
    engine = Engine(tiny.model, EngineConfig())
    real = engine.executor.run
    calls = [0]

    def run_plan(plan):
        calls[0] += 1
        if calls[0] == 3:
            raise UnitFailure("rank 1 died")
        return real(plan)

    engine.executor.run = run_plan
    streams = [engine.submit(r) for r in reqs]
    engine.run_until_idle()
    assert all(isinstance(s.final, Failed) and s.final.code is Code.UNAVAILABLE for s in streams)
    assert not engine.healthy and "rank 1 died" in engine.failure


def test_sampler_threads_are_joined_before_the_plan_returns(tiny, monkeypatch):
    """One canvas's failure on the driver thread never leaves another thread's canvas running into the next plan."""
    reqs = varied_requests(tiny, 2, seed=13)
    real, slow_done, returned_with = Executor._step, threading.Event(), []

    def step(self, rid, logits):
        if threading.current_thread() is threading.main_thread():
            raise RuntimeError("the first canvas fails at once")
        time.sleep(0.3)
        out = real(self, rid, logits)
        slow_done.set()
        return out

    monkeypatch.setattr(Executor, "_step", step)
    engine = Engine(tiny.model, EngineConfig(sampler_threads=2))
    streams = [engine.submit(r) for r in reqs]
    while not all(s.done for s in streams):
        engine.step()
        returned_with.append(slow_done.is_set())
        slow_done.clear()
    assert any(returned_with)  # the iteration with both canvases waited for the slow one
    assert sum(isinstance(s.final, Failed) for s in streams) >= 1
    engine.stop()


# -- the watchdog watches progress --------------------------------------------------------------------------


def slow_layers(monkeypatch, delay_s: float, layer: int | None = None) -> None:
    """Every layer (or only `layer`) takes `delay_s` longer."""
    real = DiffusionGemma._layer

    def _layer(self, i, *a):
        if layer is None or i == layer:
            time.sleep(delay_s)
        return real(self, i, *a)

    monkeypatch.setattr(DiffusionGemma, "_layer", _layer)


def test_a_slow_iteration_that_makes_progress_is_not_taken_for_dead(tiny, monkeypatch):
    # Each pass runs 6 layers of 0.15 s: 0.9 s per iteration, twice the watchdog's 0.4 s.
    slow_layers(monkeypatch, 0.15)
    engine = Engine(tiny.model, EngineConfig(), watchdog_s=0.4).start()
    t0 = time.monotonic()
    final = engine.submit(EngineRequest([5, 6], settings(tiny, max_new_tokens=32, max_denoising_steps=2))).result(30)
    assert isinstance(final, Finished) and engine.healthy
    assert time.monotonic() - t0 > 0.8  # it really ran iterations longer than the watchdog
    engine.stop()


def test_an_iteration_without_progress_fails_the_unit_within_the_watchdog(tiny, monkeypatch):
    slow_layers(monkeypatch, 3.0, layer=2)  # one layer that hangs for 3 s: no progress anywhere
    engine = Engine(tiny.model, EngineConfig(), watchdog_s=0.4).start()
    t0 = time.monotonic()
    stream = engine.submit(EngineRequest([5, 6], settings(tiny, max_new_tokens=32, max_denoising_steps=2)))
    final = list(stream)[-1]
    took = time.monotonic() - t0
    assert isinstance(final, Failed) and final.code is Code.UNAVAILABLE and "progress" in final.message
    assert took < 1.5, took  # 0.4 s without progress plus one watchdog period, not the 3 s hang
    engine.stop(timeout=5)


@pytest.mark.parametrize("moving", [True, False])
def test_follower_progress_reaches_rank_0_through_the_store(moving):
    """The publisher of a follower rank and rank 0's board, over a real TCPStore."""
    import torch.distributed as dist

    from dgserve.cluster.engine.progress import StoreBoard, publish

    master = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", master.port, 2, is_master=False)
    board = StoreBoard(master, 2)
    count, stop = [0], threading.Event()
    publish(client, 1, lambda: count[0], 0.05, stop)
    seen = []
    for _ in range(5):
        if moving:
            count[0] += 3
        time.sleep(0.12)
        seen.append(board.total())
    stop.set()
    if moving:
        assert seen == sorted(seen) and seen[-1] > seen[0] and seen[-1] <= 15
    else:
        assert seen == [0] * 5
