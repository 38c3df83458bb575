"""Prometheus metrics through Ray's metrics agent, updated by rank 0 after every iteration."""

from __future__ import annotations

from ray.util import metrics

from .engine.metrics import imbalance

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


class UnitMetrics:
    def __init__(self, unit: str):
        tags = {"unit": unit}
        keys = ("unit",)
        self.queue = metrics.Gauge("dgserve_queue_depth", "Requests waiting for admission", keys)
        self.running = metrics.Gauge("dgserve_running_canvases", "Requests with a canvas in flight", keys)
        self.kv_used = metrics.Gauge("dgserve_kv_bytes", "KV cache bytes held", keys)
        self.budget_used = metrics.Gauge("dgserve_budget_used_bytes", "Memory budget reserved", keys)
        self.budget = metrics.Gauge("dgserve_budget_bytes", "Memory budget capacity", keys)
        self.canvases = metrics.Histogram("dgserve_canvases_per_step", "Canvases denoised per iteration",
                                          [1, 2, 4, 8, 16, 32, 64, 128], keys)
        self.step = metrics.Histogram("dgserve_step_seconds", "Iteration latency", LATENCY_BUCKETS, keys)
        self.steps_per_block = metrics.Histogram("dgserve_steps_per_block", "Denoising steps per committed block",
                                                 [1, 2, 4, 8, 16, 24, 32, 48, 64, 128], keys)
        self.tokens_per_forward = metrics.Histogram("dgserve_tokens_per_forward",
                                                    "Generated tokens per decoder pass, per finished request",
                                                    [0.5, 1, 2, 4, 8, 16, 32, 64], keys)
        self.rejections = metrics.Counter("dgserve_rejections_total", "Requests refused at admission",
                                          ("unit", "reason"))
        self.errors = metrics.Counter("dgserve_errors_total", "Requests ended with an error", ("unit", "code"))
        self.exchange = metrics.Histogram("dgserve_expert_exchange_seconds",
                                          "Seconds per iteration in the expert all-to-all (expert compute included)",
                                          LATENCY_BUCKETS, keys)
        self.imbalance = metrics.Gauge("dgserve_expert_imbalance",
                                       "Max / mean rows per expert rank, averaged over layers (last iteration)", keys)
        self.expert_rows = metrics.Counter("dgserve_expert_rows_total", "Rows sent to each expert rank",
                                           ("unit", "expert_rank"))
        # the prefix cache: counters as totals over the unit's attention ranks, and what it holds now
        self.prefix_counters = {
            name: metrics.Counter(f"dgserve_prefix_{name}_total", doc, keys) for name, doc in (
                ("lookups", "Requests admitted that looked up a cached prompt prefix"),
                ("hits", "Requests that started from a cached prompt prefix"),
                ("tokens_reused", "Prompt tokens not encoded thanks to cached prefixes"),
                ("evictions", "Cached prefixes dropped to make room for requests"))}
        self.prefix_bytes = metrics.Gauge("dgserve_prefix_bytes", "Memory budget held by cached prompt prefixes",
                                          keys)
        self.prefix_entries = metrics.Gauge("dgserve_prefix_entries", "Cached prompt prefixes held", keys)
        self.images = metrics.Counter("dgserve_vision_images_total", "Images and video frames the vision tower "
                                                                     "encoded", keys)
        self.vision_s = metrics.Counter("dgserve_vision_seconds_total", "Seconds in the vision tower", keys)
        for m in (self.queue, self.running, self.kv_used, self.budget_used, self.budget, self.canvases, self.step,
                  self.steps_per_block, self.tokens_per_forward, self.exchange, self.imbalance, self.prefix_bytes,
                  self.prefix_entries, self.images, self.vision_s, *self.prefix_counters.values()):
            m.set_default_tags(tags)
        self.unit = unit
        self._seen_rejections: dict[str, int] = {}
        self._seen_errors: dict[str, int] = {}
        self._seen_prefix: dict[str, int] = {}

    def on_step(self, engine, outcome, step_s: float) -> None:
        m = engine.metrics
        self.queue.set(m.queue_depth)
        self.running.set(m.running)
        self.kv_used.set(m.kv_bytes)
        self.budget_used.set(m.budget_used_bytes)
        self.budget.set(m.budget_bytes)
        self.prefix_bytes.set(m.prefix_bytes)
        self.prefix_entries.set(m.prefix_entries)
        for name, counter in self.prefix_counters.items():
            now = getattr(m.prefix, name)
            if now > self._seen_prefix.get(name, 0):
                counter.inc(now - self._seen_prefix.get(name, 0))
                self._seen_prefix[name] = now
        if outcome.images:
            self.images.inc(outcome.images)
            self.vision_s.inc(outcome.vision_s)
        self.canvases.observe(len(outcome.canvases))
        self.step.observe(step_s)
        for c in outcome.canvases:
            if c.block_done:
                self.steps_per_block.observe(c.step)
        if any(any(layer) for layer in outcome.expert_rows):
            self.exchange.observe(outcome.exchange_s)
            self.imbalance.set(imbalance(outcome.expert_rows))
            for j in range(len(outcome.expert_rows[0])):
                n = sum(layer[j] for layer in outcome.expert_rows)
                if n:
                    self.expert_rows.inc(n, {"unit": self.unit, "expert_rank": str(j)})
        self.count(engine)

    def all_to_all(self, rows: list[dict]) -> None:
        """The start-up sweep's bus bandwidth per message size (nothing without expert ranks)."""
        if rows:
            gauge = metrics.Gauge("dgserve_all_to_all_busbw_gbs", "All-to-all bus bandwidth measured at start",
                                  ("unit", "bytes"))
            for r in rows:
                gauge.set(r["busbw_gbs"], {"unit": self.unit, "bytes": str(r["bytes"])})

    def finished(self, tokens_per_forward: float) -> None:
        self.tokens_per_forward.observe(tokens_per_forward)

    def count(self, engine) -> None:
        for seen, source, counter, key in ((self._seen_rejections, engine.metrics.rejections, self.rejections,
                                            "reason"),
                                           (self._seen_errors, engine.metrics.errors, self.errors, "code")):
            for k, v in list(source.items()):
                if v > seen.get(k, 0):
                    counter.inc(v - seen.get(k, 0), {"unit": self.unit, key: k})
                    seen[k] = v
