"""The prefix cache: a prompt prefix already encoded on a rank is reused, exactly, within the budget, per tenant."""

from __future__ import annotations

import random

import pytest

from dgserve.cluster.engine import EngineRequest
from dgserve.cluster.engine.budget import PREFIX

from .conftest import make_engine, settings

CHUNK = 64


def prompts(n_shared: int, tails: list[int], seed: int = 0) -> list[list[int]]:
    """Prompts that share their first `n_shared` tokens, then differ (tails of the given lengths)."""
    rng = random.Random(seed)
    shared = [rng.randint(4, 900) for _ in range(n_shared)]
    return [shared + [rng.randint(4, 900) for _ in range(t)] for t in tails]


def request(ck, ids, seed: int, tenant: str = "", new: int = 64) -> EngineRequest:
    return EngineRequest(ids, settings(ck, max_new_tokens=new, max_denoising_steps=6), seed=seed, tenant=tenant)


def run(ck, waves: list[list[EngineRequest]], cache: bool, **cfg):
    """Each wave submitted at once and run to the end; (token ids per request, stats, the engine)."""
    engine = make_engine(ck, prefill_chunk=CHUNK, max_prefill_tokens=2 * CHUNK, prefix_cache=cache, **cfg)
    out, stats = [], []
    for wave in waves:
        streams = [engine.submit(r) for r in wave]
        engine.run_until_idle()
        for s in streams:
            res = s.result(0)
            out.append(res.token_ids)
            stats.append(res.stats)
    return out, stats, engine


def test_hits_at_several_boundaries_give_the_same_tokens_alone(tiny):
    base = prompts(3 * CHUNK + 10, [0])[0]
    # one chunk, two chunks, three chunks and the whole of `base` (its last chunk is short) shared; then a prompt
    # equal to a chunk boundary (all of it cached), and one equal to `base` (its last, short chunk cached too)
    waves = [[request(tiny, base, 0)]] + [[request(tiny, base[:k] + [7, 8, 9, 10][: 1 + i], 10 + i)]
                                          for i, k in enumerate((CHUNK, 2 * CHUNK, 3 * CHUNK + 10))]
    waves += [[request(tiny, base[:2 * CHUNK], 20)], [request(tiny, base, 21)]]
    off, _, _ = run(tiny, waves, cache=False)
    on, _, engine = run(tiny, waves, cache=True)
    assert on == off
    p = engine.metrics.prefix
    assert p.lookups == 6 and p.hits == 5
    # reused: 1, 2 and 3 chunks (the third prompt's last chunk is longer than base's short one), 2 chunks (a prompt
    # equal to a boundary), all of base (a prompt equal to one already run)
    assert p.tokens_reused == CHUNK + 2 * CHUNK + 3 * CHUNK + 2 * CHUNK + (3 * CHUNK + 10)


def test_hits_give_the_same_tokens_batched(tiny):
    shared = prompts(2 * CHUNK + 5, [3, 40, 90, 17, 64], seed=1)
    warm = [request(tiny, shared[0], 1)]
    batch = [request(tiny, p, 2 + i) for i, p in enumerate(shared[1:])]
    off, _, _ = run(tiny, [warm, batch], cache=False)
    on, _, engine = run(tiny, [warm, batch], cache=True)
    solo, _, _ = run(tiny, [[r] for r in warm + batch], cache=False)
    assert on == off == solo
    assert engine.metrics.prefix.hits == 4 and engine.metrics.prefix.tokens_reused == 4 * 2 * CHUNK


def test_prefill_rows_run_only_for_the_part_not_cached(tiny):
    p = prompts(2 * CHUNK, [30, 30], seed=2)
    engine = make_engine(tiny, prefill_chunk=CHUNK, max_prefill_tokens=4 * CHUNK)
    for i, ids in enumerate(p):
        stream = engine.submit(request(tiny, ids, i))
        rows = 0
        while not engine.idle:
            out = engine.step()
            rows += out.rows.get("prefill", 0) if out is not None else 0
        assert rows == (len(ids) if i == 0 else 30)
        assert stream.result(0).stats.cached_tokens == (0 if i == 0 else 2 * CHUNK)


def test_tenants_never_share_entries(tiny):
    p = prompts(2 * CHUNK, [5, 6], seed=3)
    waves = [[request(tiny, p[0], 0, tenant="alice")], [request(tiny, p[1], 1, tenant="bob")],
             [request(tiny, p[1], 2, tenant="alice")]]
    on, _, engine = run(tiny, waves, cache=True)
    off, _, _ = run(tiny, waves, cache=False)
    assert on == off
    assert engine.metrics.prefix.lookups == 3 and engine.metrics.prefix.hits == 1  # alice's second request only
    assert engine.metrics.prefix.tokens_reused == 2 * CHUNK


def test_eviction_under_pressure_keeps_tokens_and_never_preempts_for_the_cache(tiny):
    """A budget that holds one running request and a few entries: entries are stored while there is room, and
    dropped (oldest first) whenever a commit or an admission needs the room; the shared prefix, used by every
    request, stays. Nothing is preempted that would not be without the cache."""
    p = prompts(CHUNK, [100, 70, 120, 90, 60, 110], seed=4)
    reqs = [request(tiny, ids, i, new=96) for i, ids in enumerate(p)]
    probe = make_engine(tiny, prefill_chunk=CHUNK)
    sizes, longest = probe.sizes, probe.driver.max_positions(max(map(len, p)), reqs[0].settings)
    budget = sizes.request(longest) + 2 * sizes.kv(2 * CHUNK)
    waves = [[r] for r in reqs] + [reqs[:2]]  # the last two again, at once: the second waits for the first
    off, stats_off, _ = run(tiny, waves, cache=False, memory_budget_bytes=budget, max_running=1)
    on, stats_on, engine = run(tiny, waves, cache=True, memory_budget_bytes=budget, max_running=1)
    assert on == off
    assert [s.preemptions for s in stats_on] == [s.preemptions for s in stats_off]
    pc = engine.metrics.prefix
    assert pc.hits >= 5 and pc.evictions >= 1
    assert engine.budget.used <= budget and engine.budget.held(PREFIX) == engine.metrics.prefix_bytes


def test_a_request_that_fits_only_without_the_entries_is_admitted_at_once(tiny):
    p = prompts(CHUNK, [200], seed=5)
    big = request(tiny, p[0], 0)
    other_ids = [11] * (3 * len(p[0]))  # shares nothing
    probe = make_engine(tiny, prefill_chunk=CHUNK, max_running=1)
    budget = probe.driver.max_bytes(len(other_ids), big.settings)
    engine = make_engine(tiny, prefill_chunk=CHUNK, max_prefill_tokens=4 * CHUNK, memory_budget_bytes=budget,
                         max_running=1)
    engine.submit(big)
    engine.run_until_idle()
    assert engine.metrics.prefix_entries >= 1
    need = engine.sizes.request(len(other_ids))
    assert need + engine.metrics.prefix_bytes > budget  # the entries and the next request do not fit together
    other = engine.submit(request(tiny, other_ids, 1))
    engine.step()
    assert engine.metrics.running == 1 and engine.metrics.queue_depth == 0  # admitted in the first iteration
    engine.run_until_idle()
    assert other.result(0).token_ids and engine.metrics.prefix.evictions >= 1


def test_caching_off_stores_nothing(tiny):
    p = prompts(2 * CHUNK, [5, 6], seed=6)
    _, _, engine = run(tiny, [[request(tiny, p[0], 0)], [request(tiny, p[1], 1)]], cache=False)
    assert engine.metrics.prefix.lookups == 0 and engine.metrics.prefix_entries == 0
    assert engine.executor.prefixes == {} and engine.metrics.kv_bytes == 0


def test_full_layers_share_whole_pages_and_copy_a_partial_one(tiny):
    """A hit shares the entry's whole pages (the same tensors) and copies its partial last page; the request
    that made the entry goes on writing its own pages without touching the entry's positions."""
    page = tiny.config.canvas_length
    ids = prompts(CHUNK + 10, [0], seed=7)[0]
    engine = make_engine(tiny, prefill_chunk=CHUNK, max_prefill_tokens=2 * CHUNK)
    engine.submit(request(tiny, ids, 0, new=96))
    engine.step()  # prefill of both chunks, entries stored at 64 and 74
    entries = {p.length: p for p in engine.executor.prefixes.values()}
    assert sorted(entries) == [CHUNK, CHUNK + 10]
    kept = {n: [t.clone() for t in p.tensors()] for n, p in entries.items()}
    second = engine.submit(request(tiny, ids, 1, new=96))
    engine.run_until_idle()
    assert second.result(0).token_ids
    for n, p in entries.items():  # the first request's commits wrote past the entries: their positions held
        full = [i for i, s in enumerate(tiny.config.text.layers) if not s.is_sliding]
        for i in full:
            k, _ = p.layers[i]
            assert len(k) == -(-n // page)
        for before, now in zip(kept[n], p.tensors(), strict=True):
            rows = min(now.shape[1], n % page or page)
            assert before[:, :rows].equal(now[:, :rows])
    # sharing: a cache started from the 74-position entry holds the entry's whole pages, a copy of its last one
    from dgserve.model.cache import KVCache
    p = entries[CHUNK + 10]
    c = KVCache.from_prefix(tiny.config.text, tiny.model.dtype, p)
    for layer, (k, _), spec in zip(c.layers, p.layers, tiny.config.text.layers, strict=True):
        if spec.is_sliding:
            assert same(layer.parts("k")[0], k[0])
        else:
            whole = (CHUNK + 10) // page
            assert all(same(a, b) for a, b in zip(layer.parts("k")[:whole], k[:whole], strict=True))
            assert (CHUNK + 10) % page and not same(layer.parts("k")[whole], k[whole])


def same(a, b) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("n", [CHUNK, 2 * CHUNK + 3])
def test_a_snapshot_restarts_to_the_same_cache(tiny, n):
    import torch

    ids = torch.tensor(prompts(2 * CHUNK + 3, [0], seed=8)[0])
    whole = tiny.model.new_cache(32)
    whole.want(frozenset({n}))
    for s in range(0, len(ids), CHUNK):
        tiny.model.encode(whole, ids[s:s + CHUNK])
    snap = whole.snapshot(n)
    from dgserve.model.cache import KVCache
    again = KVCache.from_prefix(tiny.config.text, tiny.model.dtype, snap)
    ref = tiny.model.new_cache(32)
    for s in range(0, n, CHUNK):
        tiny.model.encode(ref, ids[s:min(s + CHUNK, n)])
    for a, b in zip(again.layers, ref.layers, strict=True):
        assert a.length == b.length and a.keys.equal(b.keys) and a.values.equal(b.values)


def test_a_new_request_goes_to_the_rank_holding_its_longest_prefix_when_it_has_room(tiny):
    """Two attention ranks (the driver's view: a budget each). Without the cache, a request goes to the least
    loaded rank; with it, to the rank that holds its longest prefix, unless that rank is full."""
    from dgserve.cluster.engine import EngineConfig
    from dgserve.cluster.engine.budget import MemoryBudget, MemorySizes
    from dgserve.cluster.engine.driver import Driver, Request
    from dgserve.cluster.engine.events import RequestStream
    from dgserve.cluster.engine.plan import StepOutcome

    s = settings(tiny, max_new_tokens=64, max_denoising_steps=6)
    sizes = MemorySizes(tiny.config, tiny.model.dtype, tiny.config.canvas_length)
    d = Driver(tiny.config, EngineConfig(prefill_chunk=CHUNK, max_prefill_tokens=4 * CHUNK, max_running=2),
               sizes, [MemoryBudget(1 << 30), MemoryBudget(1 << 30)])
    shared, other = prompts(2 * CHUNK, [9, 20, 30], seed=9), prompts(CHUNK, [5], seed=10)[0]

    def submit(rid: int, ids: list[int]) -> Request:
        r = Request(rid, f"r{rid}", tuple(ids), s, 0, False, 2, RequestStream(f"r{rid}", None), 0.0, None)
        d.enqueue(r)
        plan = d.plan()
        d.apply(plan, StepOutcome(plan.iteration, (), stored=tuple(p.entry for p in plan.store)))
        return r

    a = submit(0, shared[0])
    b = submit(1, other)
    assert (a.rank, b.rank) == (0, 1) and d.prefix.indexes[0].entries and d.budgets[0].used > d.budgets[1].used
    c = submit(2, shared[1])  # equal load, rank 1 uses fewer bytes: the prefix on rank 0 decides
    assert c.rank == 0 and c.encoded >= 2 * CHUNK
    e = submit(3, shared[2])  # rank 0 is full (max_running=2): rank 1, from scratch
    assert e.rank == 1
    stats, _, _ = d.prefix.stats()
    assert (stats.lookups, stats.hits, stats.tokens_reused) == (4, 1, 2 * CHUNK)


def test_the_topology_setting_is_checked_by_name():
    from dgserve.cluster.config import parse_topology
    from dgserve.model.errors import ConfigError

    assert parse_topology({}).engine.prefix_cache is True  # on by default
    assert parse_topology({"engine": {"prefix_cache": False}}).engine.prefix_cache is False
    with pytest.raises(ConfigError, match=r"engine\.prefix_cache.*true \| false"):
        parse_topology({"engine": {"prefix_cache": "yes"}})
