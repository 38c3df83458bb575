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


def test_rank_0_reports_queue_canvases_latency_kv_and_errors(tiny, monkeypatch):
    for cls in ("Gauge", "Histogram", "Counter"):
        monkeypatch.setattr(m.metrics, cls, Recorder)
    Recorder.made = []
    um = m.UnitMetrics("u1")
    engine = make_engine(tiny)
    engine.on_step = um.on_step
    s = settings(tiny, max_new_tokens=64, max_denoising_steps=3)
    for i in range(3):
        engine.submit(EngineRequest([5, 6, 7], s, seed=i))
    engine.cancel(engine.driver.waiting[0].request_id if engine.driver.waiting else "none")
    engine.run_until_idle()
    by = {r.name: r for r in Recorder.made}
    assert by["dgserve_canvases_per_step"].values and max(by["dgserve_canvases_per_step"].values) >= 2
    assert len(by["dgserve_step_seconds"].values) == engine.metrics.iterations
    assert by["dgserve_steps_per_block"].values and set(by["dgserve_steps_per_block"].values) == {3}
    assert max(by["dgserve_kv_bytes"].values) > 0 and by["dgserve_budget_bytes"].values[-1] == 4 << 30
    assert by["dgserve_queue_depth"].tags == {"unit": "u1"}
