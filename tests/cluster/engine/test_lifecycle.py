"""Cancellation, deadlines, fairness, events, bad input and failures."""

from __future__ import annotations

import asyncio
import pickle

import pytest
import torch

from dgserve.cluster.engine import BlockCommitted, Draft, Engine, EngineConfig, EngineRequest, Failed, Finished
from dgserve.cluster.engine.errors import Code, Unavailable
from dgserve.model.errors import ConfigError, InputError
from dgserve.model.generate import generate
from dgserve.model.tokenizer import decode, load_tokenizer

from .conftest import held_by_requests, make_engine, settings


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cancel_mid_block_frees_the_request_at_the_next_iteration(tiny):
    engine = make_engine(tiny)
    s = settings(tiny, max_new_tokens=64, max_denoising_steps=48)
    keep = EngineRequest([5, 6, 7, 8], s, seed=3, request_id="keep")
    a = engine.submit(EngineRequest([9, 10, 11], s, seed=1, request_id="drop"))
    b = engine.submit(keep)
    for _ in range(5):
        engine.step()
    rid = next(r.rid for r in engine.driver.running if r.request_id == "drop")
    assert rid in engine.executor.slots and engine.budget.held(rid) > 0
    held_before = engine.budget.used
    assert engine.cancel(a)
    engine.step()
    assert not engine.cancel(a)  # it ended
    assert rid not in engine.executor.slots and engine.budget.held(rid) == 0
    assert engine.budget.used < held_before
    assert isinstance(a.final, Failed) and a.final.code is Code.CANCELLED and "drop" in a.final.message
    engine.run_until_idle()
    assert list(b.result(0).token_ids) == generate(tiny.model, [5, 6, 7, 8], s, seed=3).token_ids
    assert engine.metrics.errors["CANCELLED"] == 1 and held_by_requests(engine) == 0


def test_an_expired_request_ends_with_a_deadline_error_and_frees_its_memory(tiny):
    clock = FakeClock()
    engine = Engine(tiny.model, EngineConfig(), clock=clock)
    s = settings(tiny, max_new_tokens=64, max_denoising_steps=48)
    late = engine.submit(EngineRequest([5, 6, 7], s, timeout_s=5.0))
    ok = engine.submit(EngineRequest([5, 6, 7], s, timeout_s=500.0))
    engine.step()
    clock.now += 6
    engine.step()
    assert isinstance(late.final, Failed) and late.final.code is Code.DEADLINE_EXCEEDED
    assert "deadline" in late.final.message
    assert len(engine.executor.slots) == 1
    engine.run_until_idle()
    assert isinstance(ok.final, Finished) and held_by_requests(engine) == 0


def test_a_long_request_still_progresses_under_a_stream_of_short_ones(tiny):
    """FIFO by bytes: a head that does not fit waits and nothing behind it skips ahead, so a large request is
    admitted as soon as the memory it needs frees up, however many small ones keep arriving."""
    C = tiny.config.canvas_length
    long_req = EngineRequest(list(range(4, 304)), settings(tiny, max_new_tokens=C, max_denoising_steps=6),
                             seed=2, request_id="long")
    short_s = settings(tiny, max_new_tokens=C, max_denoising_steps=6)
    probe = make_engine(tiny, max_running=2)
    # Room for the long request alone, or for two short ones, never for the long one beside a short one.
    budget = probe.driver.max_bytes(300, long_req.settings)
    assert probe.sizes.request(300) + probe.sizes.request(5) > budget >= 2 * probe.sizes.request(5)
    engine = make_engine(tiny, max_running=2, memory_budget_bytes=budget)
    admitted = []
    plan = engine.driver.plan
    engine.driver.plan = lambda: (p := plan(), admitted.extend(a.rid for a in p.admit))[0]
    shorts = [engine.submit(EngineRequest([5, 6, 7, 8, 9], short_s, seed=i, request_id=f"s{i}")) for i in range(2)]
    engine.step()
    long = engine.submit(long_req)
    for _ in range(200):  # two short requests always wait behind the long one
        if long.done:
            break
        while len(shorts) + 1 - len(admitted) < 3:  # submitted, not yet admitted
            i = len(shorts)
            shorts.append(engine.submit(EngineRequest([5, 6, 7, 8, 9], short_s, seed=i, request_id=f"s{i}")))
        engine.step()
    assert isinstance(long.final, Finished)
    assert admitted[2] == 2  # the long request's rid: admitted right after the two that ran before it came
    engine.run_until_idle()
    assert all(isinstance(s.final, Finished) for s in shorts)


def test_events_drafts_blocks_text_and_final_statistics(tiny_dir, tiny):
    tok = load_tokenizer(tiny_dir)
    clock = FakeClock()  # one second per iteration

    def tick(engine, outcome, step_s):
        clock.now += 1

    engine = Engine(tiny.model, EngineConfig(max_running=1), tokenizer=tok, clock=clock, on_step=tick)
    s = settings(tiny, max_new_tokens=64, max_denoising_steps=7)
    stream = engine.submit(EngineRequest([2, 105, 40, 41, 42], s, seed=4, drafts=True, request_id="ev"))
    quiet = engine.submit(EngineRequest([2, 105, 40, 41, 42], s, seed=4))
    engine.run_until_idle()
    events = list(stream)
    drafts = [e for e in events if isinstance(e, Draft)]
    blocks = [e for e in events if isinstance(e, BlockCommitted)]
    final = events[-1]
    assert isinstance(final, Finished) and stream.request_id == "ev"
    assert [b.block for b in blocks] == list(range(final.stats.blocks))
    assert len(drafts) == sum(final.stats.steps_per_block) == sum(b.steps for b in blocks)
    for b in blocks:  # the last draft of a block is its argmax canvas
        last = [d for d in drafts if d.block == b.block][-1]
        assert last.step == b.steps and len(last.token_ids) == tiny.config.canvas_length
        assert b.text == decode(tok, list(b.token_ids), s.pad_token_id)
    assert final.token_ids == tuple(t for b in blocks for t in b.token_ids)
    assert final.text == decode(tok, list(final.token_ids), s.pad_token_id)
    st, steps = final.stats, final.stats.steps_per_block
    valid = sum(t != s.pad_token_id for t in final.token_ids)
    assert st.blocks == len(blocks) and st.tokens_per_forward == pytest.approx(valid / sum(steps))
    # Admitted at once; its first block came out in iteration steps[0], its last in iteration sum(steps).
    assert (st.queue_s, st.time_to_first_block_s, st.total_s) == (0, steps[0] - 1, sum(steps) - 1)
    assert not any(isinstance(e, Draft) for e in quiet)  # drafts only when asked
    assert quiet.result(0).token_ids == final.token_ids  # same seed and settings
    assert quiet.result(0).stats.queue_s == sum(steps)  # one canvas at a time: it waited for "ev" to end


def test_async_consumers_on_a_running_engine(tiny):
    s = settings(tiny, max_new_tokens=64, max_denoising_steps=6)

    async def consume(engine, i):
        stream = engine.submit(EngineRequest([5, 6, 7 + i], s, seed=i))
        return [e async for e in stream]

    async def main(engine):
        return await asyncio.gather(*(consume(engine, i) for i in range(6)))

    with make_engine(tiny) as engine:
        results = asyncio.run(asyncio.wait_for(main(engine), 60))
    for i, events in enumerate(results):
        assert isinstance(events[-1], Finished)
        assert events[-1].token_ids == tuple(generate(tiny.model, [5, 6, 7 + i], s, seed=i).token_ids)


def test_stopping_fails_active_requests_as_retriable(tiny):
    engine = make_engine(tiny).start()
    # no EOS: none can end on its own first (which seed hits EOS early depends on the CPU's float32 kernels)
    s = settings(tiny, max_new_tokens=96, max_denoising_steps=48, eos_token_ids=())
    streams = [engine.submit(EngineRequest([5, 6, 7], s, seed=i)) for i in range(3)]
    streams[0].get(timeout=30)  # running: its first block is out, 96 more steps to go
    engine.stop()
    for st in streams:
        assert isinstance(st.final, Failed) and st.final.code is Code.UNAVAILABLE and st.final.retriable
    with pytest.raises(Unavailable):
        engine.submit(EngineRequest([5], s))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"prompt_ids": []}, "prompt_ids"),
    ({"prompt_ids": [5, 99999]}, "prompt_ids"),
    ({"prompt_ids": [-1]}, "prompt_ids"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"timeout_s": "soon"}, "timeout_s"),
    ({"settings": {"max_new_tokens": 4}}, "settings"),
    ({"request_id": ""}, "request_id"),
])
def test_bad_requests_are_refused_naming_the_field_and_the_engine_keeps_serving(tiny, kwargs, field):
    engine = make_engine(tiny)
    base = {"prompt_ids": [5, 6], "settings": settings(tiny, max_new_tokens=32, max_denoising_steps=3)}
    with pytest.raises(InputError) as e:
        engine.submit(EngineRequest(**{**base, **kwargs}))
    assert e.value.field == field and str(e.value).startswith(field)
    ok = engine.submit(EngineRequest(**base))
    engine.run_until_idle()
    assert isinstance(ok.final, Finished)


def test_text_is_decoded_on_the_way_out_never_on_the_driver_thread(tiny_dir, tiny):
    import threading

    tok = load_tokenizer(tiny_dir)
    threads = []

    class Watched:
        def decode(self, ids, **kw):
            threads.append(threading.current_thread().name)
            return tok.decode(ids, **kw)

    s = settings(tiny, max_new_tokens=64, max_denoising_steps=3)
    with Engine(tiny.model, EngineConfig(), tokenizer=Watched()) as engine:
        events = list(engine.submit(EngineRequest([5, 6, 7], s, seed=2)))
    texts = [e.text for e in events if isinstance(e, BlockCommitted | Finished)]
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert threads and "dgserve-driver" not in threads


def test_a_long_prompt_over_the_context_is_refused(tiny):
    engine = make_engine(tiny)
    n = tiny.config.text.max_position_embeddings
    with pytest.raises(InputError, match="exceed the model's context of 32768 positions"):
        engine.submit(EngineRequest([5] * n, settings(tiny, max_new_tokens=32)))


def test_requests_sharing_a_request_id_are_separate_requests(tiny):
    """A request id is the client's label: a request with another's id neither is refused (which would say the
    id is live) nor touches the other when it is cancelled or ends; the label is free to reuse at once."""
    engine = make_engine(tiny)
    long_s = settings(tiny, max_new_tokens=96, max_denoising_steps=16)
    short_s = settings(tiny, max_new_tokens=32, max_denoising_steps=3)
    victim = engine.submit(EngineRequest([5, 6, 7], long_s, seed=1, request_id="same"))
    short = engine.submit(EngineRequest([8, 9], short_s, seed=2, request_id="same"))
    doomed = engine.submit(EngineRequest([10, 11], long_s, seed=3, request_id="same"))
    for _ in range(4):  # the short one ends; the others are mid-block
        engine.step()
    assert short.done and not victim.done and not doomed.done
    assert sorted(engine.placements()) == [("same", 0), ("same", 0)]
    assert engine.cancel(doomed) and not engine.cancel(short)
    engine.step()
    retry = engine.submit(EngineRequest([10, 11], long_s, seed=3, request_id="same"))  # reused at once
    engine.run_until_idle()
    assert isinstance(doomed.final, Failed) and doomed.final.code is Code.CANCELLED
    for stream, prompt, s, seed in ((victim, [5, 6, 7], long_s, 1), (short, [8, 9], short_s, 2),
                                    (retry, [10, 11], long_s, 3)):
        assert list(stream.result(0).token_ids) == generate(tiny.model, prompt, s, seed=seed).token_ids
    assert engine.metrics.errors["CANCELLED"] == 1 and held_by_requests(engine) == 0


def test_a_failing_iteration_fails_its_requests_and_the_engine_keeps_serving(tiny, monkeypatch):
    engine = make_engine(tiny)
    s = settings(tiny, max_new_tokens=32, max_denoising_steps=3)
    doomed = engine.submit(EngineRequest([5, 6], s))
    real = engine.executor.model.forward
    monkeypatch.setattr(engine.executor.model, "forward", lambda *a: (_ for _ in ()).throw(MemoryError("boom")))
    engine.step()
    assert isinstance(doomed.final, Failed) and doomed.final.code is Code.RESOURCE_EXHAUSTED
    assert "boom" in doomed.final.message and "out of memory" in doomed.final.message
    monkeypatch.setattr(engine.executor.model, "forward", real)
    ok = engine.submit(EngineRequest([5, 6], s))
    engine.run_until_idle()
    assert isinstance(ok.final, Finished) and held_by_requests(engine) == 0 and not engine.executor.slots


def test_the_step_plan_is_a_plain_picklable_message(tiny):
    engine = make_engine(tiny)
    engine.submit(EngineRequest([5, 6, 7], settings(tiny, max_new_tokens=32, max_denoising_steps=3)))
    engine._drain_inbox()
    plan = engine.driver.plan()
    clone = pickle.loads(pickle.dumps(plan))
    assert clone == plan and plan.items and plan.admit

    def tensors(x):
        if isinstance(x, torch.Tensor):
            return True
        if isinstance(x, tuple | list):
            return any(tensors(v) for v in x)
        return any(tensors(getattr(x, f)) for f in getattr(x, "__slots__", ()))
    assert not tensors(plan)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_running": 0}, "max_running"),
    ({"max_queued": -1}, "max_queued"),
    ({"prefill_chunk": 0}, "prefill_chunk"),
    ({"prefill_chunk": 64, "max_prefill_tokens": 32}, "max_prefill_tokens"),
    ({"memory_budget_bytes": 0}, "memory_budget_bytes"),
    ({"page_size": 0}, "page_size"),
    ({"default_timeout_s": -1}, "default_timeout_s"),
])
def test_engine_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as e:
        EngineConfig(**kwargs)
    assert e.value.field == field and "allowed" in str(e.value)
    with pytest.raises(ConfigError, match="bogus"):
        EngineConfig.from_dict({"bogus": 1})


def test_the_watchdog_fails_a_hung_iteration_as_retriable_and_marks_the_engine_unhealthy(tiny):
    import threading

    hang = threading.Event()

    class HungExecutor:
        """Stands in for a group whose rank stopped answering: the iteration never returns."""

        def run(self, plan):
            hang.wait(30)
            raise RuntimeError("released")

        def heartbeat(self, iteration):
            pass

        def stop(self):
            pass

        def close(self):
            pass

    engine = Engine(tiny.model, EngineConfig(), executor=HungExecutor(), watchdog_s=0.5).start()
    stream = engine.submit(EngineRequest([5, 6], settings(tiny, max_new_tokens=32)))
    event = list(stream)[-1]
    assert isinstance(event, Failed) and event.code is Code.UNAVAILABLE and "watchdog" in event.message
    assert not engine.healthy
    with pytest.raises(Unavailable, match="failed"):
        engine.submit(EngineRequest([5, 6], settings(tiny, max_new_tokens=32)))
    hang.set()
    engine.stop()


def test_a_crash_in_the_driver_loop_fails_requests_visibly_instead_of_hanging(tiny, monkeypatch):
    engine = make_engine(tiny).start()
    monkeypatch.setattr(engine.driver, "apply", lambda plan, outcome: 1 / 0)
    stream = engine.submit(EngineRequest([5, 6], settings(tiny, max_new_tokens=32, max_denoising_steps=3)))
    final = list(stream)[-1]
    assert isinstance(final, Failed) and final.code is Code.UNAVAILABLE and "ZeroDivisionError" in final.message
    assert not engine.healthy
    engine.stop()


def test_a_consumer_whose_event_loop_closed_does_not_break_the_engine(tiny):
    s = settings(tiny, max_new_tokens=64, max_denoising_steps=5)
    engine = make_engine(tiny)
    stream = engine.submit(EngineRequest([5, 6, 7], s, request_id="gone"))
    loop = asyncio.new_event_loop()
    waiting = loop.create_task(stream.__aiter__().__anext__())
    loop.run_until_complete(asyncio.sleep(0))  # the consumer now waits for an event on this loop ...
    assert not waiting.done()
    loop.close()  # ... which closes without ever waking it
    later = engine.submit(EngineRequest([5, 6, 8], s, seed=1))
    engine.run_until_idle()
    assert isinstance(stream.final, Finished) and isinstance(later.final, Finished) and engine.healthy


def test_a_cancelled_request_id_can_be_reused_at_once_and_the_new_one_runs(tiny):
    engine = make_engine(tiny)
    s = settings(tiny, max_new_tokens=32, max_denoising_steps=5)
    first = engine.submit(EngineRequest([5, 6], s, request_id="retry-me"))
    engine.step()
    assert engine.cancel(first)
    second = engine.submit(EngineRequest([5, 6], s, request_id="retry-me"))  # a client's retry
    engine.run_until_idle()
    assert isinstance(first.final, Failed) and first.final.code is Code.CANCELLED
    assert isinstance(second.final, Finished)
