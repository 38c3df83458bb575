"""Engine units on a real local Ray cluster: tokens, cancellation, failures, attention ranks, autoscaling."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import ray

from dgserve.cluster.engine.errors import Code
from dgserve.cluster.engine.events import Draft, Failed, Finished
from dgserve.cluster.messages import GenerateRequest
from dgserve.model.generate import generate
from dgserve.model.loader import load_checkpoint
from dgserve.model.sampler import SamplerSettings


@pytest.fixture(scope="module")
def local_model(tiny_dir):
    return load_checkpoint(tiny_dir, dtype="float32")


def requests(n: int, seed: int = 0) -> list[GenerateRequest]:
    import random

    rng = random.Random(seed)
    return [GenerateRequest(tuple(rng.randint(4, 900) for _ in range(rng.randint(1, 60))), seed=7 * i,
                            sampler={"max_new_tokens": rng.choice([32, 64]),
                                     "max_denoising_steps": rng.choice([8, 16]), "t_max": rng.choice([0.8, 1.0])},
                            request_id=f"q{i}")
            for i in range(n)]


def solo(ck, r: GenerateRequest) -> tuple[int, ...]:
    s = SamplerSettings.from_defaults(ck.generation, **r.sampler)
    return tuple(generate(ck.model, list(r.prompt_ids), s, seed=r.seed).token_ids)


async def gather(unit, reqs):
    return await asyncio.gather(*(unit.generate(r) for r in reqs))


def test_eight_concurrent_requests_through_a_unit_give_the_single_process_tokens(deploy, local_model):
    unit = deploy(engine={"max_running": 8})
    reqs = requests(8)
    finals = asyncio.run(gather(unit, reqs))
    for r, f in zip(reqs, finals, strict=True):
        assert f.token_ids == solo(local_model, r), r.request_id
    st = unit.status()["ranks"][0]
    assert st["healthy"] and st["request_bytes"] == 0
    # They shared iterations: one at a time takes at least their own steps added up (136 here); all eight
    # together take about as many as the longest request (32), plus the iterations before the last one arrived.
    own_steps = sum(sum(f.stats.steps_per_block) for f in finals)
    assert st["iterations"] < own_steps / 2, (st["iterations"], own_steps)


def test_bad_requests_fail_with_invalid_argument_and_the_unit_keeps_serving(deploy):
    unit = deploy()
    for bad, field in ((GenerateRequest(()), "prompt_ids"),
                       (GenerateRequest((5, 99999)), "prompt_ids"),
                       (GenerateRequest((5,), sampler={"t_max": 0.1}), "t_max"),
                       (GenerateRequest((5,), sampler={"temperature": 1.0}), "temperature"),
                       (GenerateRequest((5,), seed=-1), "seed")):
        events = list(unit.stream_sync(bad))
        assert len(events) == 1 and isinstance(events[0], Failed), bad
        assert events[0].code is Code.INVALID_ARGUMENT and field in events[0].message
    ok = unit.generate_sync(GenerateRequest((5, 6), sampler={"max_new_tokens": 32, "max_denoising_steps": 2}))
    assert len(ok.token_ids) == 32


def test_cancelling_mid_block_frees_the_request_on_rank_0(deploy):
    unit = deploy()
    req = GenerateRequest((5, 6, 7), drafts=True, request_id="to-cancel",
                          sampler={"max_new_tokens": 32 * 20, "max_denoising_steps": 48})

    async def run():
        stream = unit.stream(req)
        first = await stream.__anext__()
        assert isinstance(first, Draft)  # running, mid-block
        assert "to-cancel" in (await unit.status_async())["ranks"][0]["request_ids"]
        await stream.aclose()

    asyncio.run(run())
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # the error count is taken at the end of the iteration that freed it
        st = unit.status()["ranks"][0]
        if ("to-cancel" not in st["request_ids"] and not st["slots"] and st["request_bytes"] == 0
                and st["errors"].get("CANCELLED") == 1):
            break
        time.sleep(0.2)
    assert "to-cancel" not in st["request_ids"] and not st["slots"] and st["request_bytes"] == 0
    assert st["errors"].get("CANCELLED") == 1


@pytest.mark.slow  # ~55 s; test_cancelling_mid_block_frees_the_request_on_rank_0 runs in `make test`
def test_a_call_reusing_a_running_requests_id_and_abandoned_at_once_never_touches_it(deploy, local_model):
    """A request id is the client's label, never a handle: calls that send a running request's id and go away
    within 0-38 ms cancel only themselves; the running request ends with the tokens it has alone."""
    unit = deploy(engine={"max_running": 4})
    victim = GenerateRequest((5, 6, 7), seed=3, request_id="victim",
                             sampler={"max_new_tokens": 32 * 16, "max_denoising_steps": 48})
    attack = GenerateRequest((8, 9), request_id="victim",
                             sampler={"max_new_tokens": 32 * 20, "max_denoising_steps": 48})

    async def run():
        task = asyncio.create_task(unit.generate(victim))
        while "victim" not in (await unit.status_async())["ranks"][0]["request_ids"]:
            await asyncio.sleep(0.01)
        for i in range(20):
            response = unit.handle.options(stream=True).generate.remote(attack)
            await asyncio.sleep(i * 0.002)
            response.cancel()
        ran = not task.done()
        final = await task  # raises EngineError (CANCELLED) if an attacker's call reached it
        assert ran, "the victim ended before the last attack: make it longer"
        return final

    final = asyncio.run(run())
    assert final.token_ids == solo(local_model, victim)
    deadline = time.monotonic() + 2  # an abandoned call's request left running would outlast the victim's
    while (st := unit.status()["ranks"][0])["request_ids"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not st["request_ids"] and not st["slots"] and st["request_bytes"] == 0
    assert st["errors"].get("CANCELLED", 0) >= 1  # some attackers' requests did run, and ended as cancelled


def test_rank_0_ends_only_the_call_the_unit_cancels_even_when_the_cancel_starts_first(local_model):
    """In process, no Ray: an async actor may start the unit's cancel before the call it ends, so the key is kept
    and that call never submits; a cancel ends its own call only, not another with the same request id."""
    from types import SimpleNamespace

    from dgserve.cluster.engine import Engine
    from dgserve.cluster.ranks import RankActor

    rank = RankActor(0, 1, {}, "u")
    rank.defaults = local_model.generation
    rank.metrics = SimpleNamespace(finished=lambda tokens_per_forward: None, count=lambda engine: None)
    req = GenerateRequest((5, 6, 7), request_id="same", sampler={"max_new_tokens": 32 * 4, "max_denoising_steps": 16})

    async def run():
        await rank.cancel("early")
        assert [e async for e in rank.generate(req, "early")] == [] and rank.engine.idle
        doomed, kept = rank.generate(req, "doomed"), rank.generate(req, "kept")
        await asyncio.gather(doomed.__anext__(), kept.__anext__())  # both running: their first blocks are out
        await rank.cancel("doomed")
        return [e async for e in doomed], [e async for e in kept]

    with Engine(local_model.model) as rank.engine:
        doomed, kept = asyncio.run(asyncio.wait_for(run(), 60))
    assert isinstance(doomed[-1], Failed) and doomed[-1].code is Code.CANCELLED
    assert isinstance(kept[-1], Finished) and kept[-1].token_ids == solo(local_model, req)
    assert not rank._calls


@pytest.mark.parametrize(("ranks", "experts", "victim", "how"),
                         [pytest.param(1, 0, 0, "kill", marks=pytest.mark.slow), (2, 0, 1, "stop")],
                         ids=["rank0-of-1-killed", "rank1-of-2-stopped"])  # a follower killed: test_multinode.py
def test_a_dead_or_hung_rank_fails_its_requests_as_retriable_and_the_unit_comes_back(deploy, ranks, experts, victim,
                                                                                     how, capsys):
    """SIGKILL (ray.kill) or SIGSTOP of a rank (an attention or an expert rank): the request fails UNAVAILABLE
    within the watchdog time (a stopped rank makes no progress and does not answer), and Serve rebuilds the unit."""
    unit = deploy(attention_ranks=ranks, expert_ranks=experts, profile="packed" if experts else "replicated",
                  watchdog_s=3, serve={"health_check_period_s": 1.0, "health_check_timeout_s": 5.0})
    before = unit.status()
    name, pid = before["names"][victim], before["ranks"][victim]["pid"]
    req = GenerateRequest((5, 6, 7), sampler={"max_new_tokens": 32 * 30, "max_denoising_steps": 48})

    async def run():
        events = []
        stream = unit.stream(req)
        events.append(await stream.__anext__())
        if how == "kill":
            ray.kill(ray.get_actor(name))
        else:
            os.kill(pid, signal.SIGSTOP)
        hit = time.monotonic()
        async for e in stream:
            events.append(e)
        return events, time.monotonic() - hit

    try:
        events, took = asyncio.run(run())
    finally:
        if how == "stop":
            os.kill(pid, signal.SIGKILL)  # a stopped process takes SIGKILL; nothing of it is left behind
    assert isinstance(events[-1], Failed) and events[-1].code is Code.UNAVAILABLE and events[-1].retriable
    assert took < 3 + 2, (took, events[-1])  # the watchdog (3 s), or the unit's health check finding it first
    t0 = time.monotonic()
    while True:  # the client's retry loop
        try:
            f = unit.generate_sync(GenerateRequest((5, 6), sampler={"max_new_tokens": 32, "max_denoising_steps": 2}))
            break
        except Exception:
            assert time.monotonic() - t0 < 60, "the unit did not come back within 60 s"
            time.sleep(1)
    back = time.monotonic() - t0
    assert len(f.token_ids) == 32 and back < 60
    with capsys.disabled():
        print(f"\n{how} rank {victim} of {ranks} attention + {experts} expert ranks: request failed UNAVAILABLE after "
              f"{took:.2f}s; the unit served again {back:.1f}s later")
    after = unit.status()  # a new unit: the killed rank's actor is not one of its ranks
    assert after["unit"] != before["unit"] and name not in after["names"], (before["names"], after["names"])
    assert len(after["names"]) == ranks + experts and all(s["healthy"] for s in after["ranks"])


# Units with expert ranks (packed and disaggregated, through the gateway): test_multinode.py.


def test_two_attention_ranks_serve_requests_on_both(deploy, local_model):
    unit = deploy(attention_ranks=2, engine={"max_running": 4})
    reqs = requests(6, seed=4)
    finals = asyncio.run(gather(unit, reqs))
    for r, f in zip(reqs, finals, strict=True):
        assert f.token_ids == solo(local_model, r), r.request_id
    st = unit.status()
    admitted = st["ranks"][0]["admitted_per_rank"]
    assert admitted.get(0, 0) > 0 and admitted.get(1, 0) > 0
    assert all(s["healthy"] for s in st["ranks"])


@pytest.mark.slow  # ~85 s: two units start and one stops
def test_units_scale_up_under_load_and_back_down_losing_nothing(deploy, local_model):
    from ray import serve

    unit = deploy(units={"min": 1, "max": 2}, engine={"max_running": 2},
                  serve={"target_ongoing_requests": 2, "upscale_delay_s": 0.5, "downscale_delay_s": 2,
                         "look_back_period_s": 1, "max_request_s": 120})

    def running() -> int:
        app = serve.status().applications[unit.topology.name]
        return app.deployments["EngineUnit"].replica_states.get("RUNNING", 0)

    shapes = [GenerateRequest((5, 6, 7 + i), seed=i, sampler={"max_new_tokens": 32 * 4, "max_denoising_steps": 24})
              for i in range(3)]
    tail = GenerateRequest((9, 9), seed=9, sampler={"max_new_tokens": 32 * 12, "max_denoising_steps": 48})
    expected = {r.seed: solo(local_model, r) for r in [*shapes, tail]}
    done: list = []
    seen: list[int] = []

    async def client(k: int, stop: asyncio.Event) -> None:
        while not stop.is_set():
            r = shapes[k % 3]
            done.append((r.seed, await unit.generate(r)))

    async def run() -> None:
        stop = asyncio.Event()
        clients = [asyncio.create_task(client(k, stop)) for k in range(6)]
        t0, both_since = time.monotonic(), None
        while time.monotonic() - t0 < 90:  # load until two units have run side by side for 3 s
            seen.append(running())
            both_since = (both_since or time.monotonic()) if seen[-1] == 2 else None
            if both_since and time.monotonic() - both_since > 3:
                break
            await asyncio.sleep(0.25)
        stop.set()
        last = asyncio.create_task(unit.generate(tail))  # in flight while the load drops and a unit drains
        await asyncio.gather(*clients)
        while not last.done():
            seen.append(running())
            await asyncio.sleep(0.25)
        done.append((tail.seed, last.result()))

    asyncio.run(run())
    assert 2 in seen, seen
    assert len(done) >= 12  # every request sent came back
    for seed, f in done:  # none lost, none changed by where it ran
        assert isinstance(f, Finished) and f.token_ids == expected[seed]
    deadline = time.monotonic() + 30
    while running() != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert running() == 1


def test_unit_metrics_are_exported_to_prometheus(deploy, ray_cluster):
    import urllib.request

    unit = deploy()
    unit.generate_sync(GenerateRequest((5, 6), sampler={"max_new_tokens": 64, "max_denoising_steps": 3}))
    want = ("ray_dgserve_queue_depth", "ray_dgserve_running_canvases", "ray_dgserve_kv_bytes",
            "ray_dgserve_budget_bytes", "ray_dgserve_canvases_per_step", "ray_dgserve_step_seconds",
            "ray_dgserve_steps_per_block", "ray_dgserve_tokens_per_forward", "ray_dgserve_prefix_bytes",
            "ray_dgserve_prefix_entries", "ray_dgserve_prefix_lookups_total")  # a counter, as the dashboard names it
    unit_tag = f'unit="{unit.status()["unit"]}"'

    def ours(text: str) -> list[str]:  # this unit's series (earlier tests' units export theirs too)
        return [m for m in want if any(line.startswith(m) and unit_tag in line for line in text.splitlines())]

    t0, found = time.monotonic(), []
    while len(found) < len(want) and time.monotonic() - t0 < 60:
        body = urllib.request.urlopen(f"http://127.0.0.1:{ray_cluster.metrics_port}/metrics", timeout=5).read()
        found = ours(body.decode())
        time.sleep(1)
    assert sorted(found) == sorted(want), set(want) - set(found)
