"""Unit metrics: what rank 0 reports to Prometheus after an iteration (Ray's metric classes recorded)."""

from __future__ import annotations

from dgserve.cluster import metrics as m
from dgserve.cluster.engine import EngineRequest

from .engine.conftest import make_engine, settings


class Recorder:
    made: list = []

    def __init__(self, name, description="", *args, **kw):
        self.name, self.values, self.tags = name, [], {}
        Recorder.made.append(self)

    def set_default_tags(self, tags):
        self.tags = tags

    def set(self, v, tags=None):
        self.values.append(v)

    def observe(self, v, tags=None):
        self.values.append(v)

    def inc(self, v=1, tags=None):
        self.values.append((v, tags))


def recorded_unit_metrics(monkeypatch) -> m.UnitMetrics:
    """UnitMetrics whose Ray metric classes record what they are given (in Recorder.made)."""
    for cls in ("Gauge", "Histogram", "Counter"):
        monkeypatch.setattr(m.metrics, cls, Recorder)
    Recorder.made = []
    return m.UnitMetrics("u1")


def test_rank_0_reports_queue_canvases_latency_kv_and_errors(confident, monkeypatch):
    um = recorded_unit_metrics(monkeypatch)
    engine = make_engine(confident, max_running=2)
    engine.on_step = um.on_step
    s = settings(confident, max_new_tokens=64)
    streams = [engine.submit(EngineRequest([5, 6, 7 + i], s, seed=i, request_id=f"r{i}")) for i in range(5)]
    engine.step()  # r0 and r1 run, r2..r4 wait
    assert engine.cancel(streams[4])
    engine.run_until_idle()
    by = {r.name: r for r in Recorder.made}
    assert max(by["dgserve_queue_depth"].values) == 3 and by["dgserve_queue_depth"].values[-1] == 0
    assert max(by["dgserve_running_canvases"].values) == 2 and by["dgserve_running_canvases"].values[-1] == 0
    assert max(by["dgserve_canvases_per_step"].values) == 2
    assert len(by["dgserve_step_seconds"].values) == engine.metrics.iterations
    steps = sorted(n for st in streams[:4] for n in st.result(0).stats.steps_per_block)
    assert sorted(by["dgserve_steps_per_block"].values) == steps and len(set(steps)) > 1
    assert max(by["dgserve_kv_bytes"].values) > 0 and by["dgserve_budget_bytes"].values[-1] == 4 << 30
    assert by["dgserve_errors_total"].values == [(1, {"unit": "u1", "code": "CANCELLED"})]
    assert by["dgserve_queue_depth"].tags == {"unit": "u1"}


def test_expert_imbalance_is_max_over_mean_rows_averaged_over_layers():
    from dgserve.cluster.engine.metrics import EngineMetrics, imbalance
    from dgserve.cluster.engine.plan import StepOutcome

    assert imbalance(((5, 5), (8, 0))) == 1.5 and imbalance(((0, 0),)) == 1.0
    m = EngineMetrics()
    m.record(StepOutcome(1, (), exchange_s=0.25, expert_rows=((3, 1), (2, 2))), 0.5)
    m.record(StepOutcome(2, ()), 0.1)  # no exchange: not counted
    s = m.step_summary()
    assert s["exchange_s_mean"] == 0.25 and s["expert_imbalance_mean"] == 1.25 and s["expert_rows"] == {0: 5, 1: 3}


def test_rank_0_reports_the_prefix_cache(tiny, monkeypatch):
    um = recorded_unit_metrics(monkeypatch)
    engine = make_engine(tiny, prefill_chunk=16)
    engine.on_step = um.on_step
    s = settings(tiny, max_new_tokens=32, max_denoising_steps=2)
    for tail in ([1], [2], [3]):
        engine.submit(EngineRequest(list(range(10, 50)) + tail, s))
        engine.run_until_idle()
    by = {r.name: r for r in Recorder.made}
    total = {n: sum(v for v, _ in by[f"dgserve_prefix_{n}_total"].values)
             for n in ("lookups", "hits", "tokens_reused", "evictions")}
    assert total == {"lookups": 3, "hits": 2, "tokens_reused": 64, "evictions": 0}
    assert by["dgserve_prefix_bytes"].values[-1] == engine.metrics.prefix_bytes > 0
    assert by["dgserve_prefix_entries"].values[-1] == 5  # at 16 and 32 (shared), and each prompt's end (41)


def test_rank_0_reports_the_vision_tower(tiny, monkeypatch):
    from dgserve.model.media import MediaProcessor
    from dgserve.model.tokenizer import chat_prompt_ids, load_tokenizer
    from tests.model.test_media import encoded

    um = recorded_unit_metrics(monkeypatch)
    engine = make_engine(tiny)
    engine.on_step = um.on_step
    proc, tok = MediaProcessor.from_checkpoint(tiny.folder), load_tokenizer(tiny.folder)
    images = [proc.image(encoded(40, 60, seed=i), "i", 70) for i in range(3)]
    s = settings(tiny, max_new_tokens=32, max_denoising_steps=2)
    for batch in (images[:2], images[2:]):
        engine.submit(EngineRequest(chat_prompt_ids(tok, "Look.", images=batch), s, media=tuple(batch)))
        engine.run_until_idle()
    by = {r.name: r for r in Recorder.made}
    assert [v for v, _ in by["dgserve_vision_images_total"].values] == [2, 1] and engine.metrics.images == 3
    seconds = sum(v for v, _ in by["dgserve_vision_seconds_total"].values)
    assert seconds > 0 and abs(seconds - engine.metrics.time_s["vision"]) < 1e-9
