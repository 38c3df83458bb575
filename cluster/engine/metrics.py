"""The engine's own counters and latency summaries (what the Prometheus exporter and the benchmarks read).

`EngineMetrics.record` folds one iteration's outcome in; nothing here touches requests or tensors.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from .plan import StepOutcome


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of `values` by nearest rank from below; NaN for no values."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q={q!r} is not in 0..1")
    xs = sorted(values)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def imbalance(rows: tuple[tuple[int, ...], ...]) -> float:
    """The mean over layers (that sent rows) of max / mean rows per expert rank: 1.0 is perfectly even."""
    ratios = [max(layer) * len(layer) / sum(layer) for layer in rows if sum(layer)]
    return sum(ratios) / len(ratios) if ratios else 1.0


@dataclass
class PrefixStats:
    lookups: int = 0  # requests admitted with caching on (each looked up once)
    hits: int = 0
    tokens_reused: int = 0  # prompt positions not encoded thanks to a hit
    stored: int = 0
    evictions: int = 0  # entries dropped for room

    def add(self, other: PrefixStats) -> None:
        for k in vars(self):
            setattr(self, k, getattr(self, k) + getattr(other, k))


@dataclass
class EngineMetrics:
    iterations: int = 0
    queue_depth: int = 0
    running: int = 0
    paused: int = 0
    canvases_last_step: int = 0
    kv_bytes: int = 0
    budget_used_bytes: int = 0
    budget_bytes: int = 0
    step_s_total: float = 0.0
    time_s: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "commit": 0.0, "denoise": 0.0,
                                                              "sampling": 0.0, "vision": 0.0})
    images: int = 0  # images and video frames the vision tower encoded
    canvas_steps: int = 0
    rejections: Counter = field(default_factory=Counter)  # by reason
    errors: Counter = field(default_factory=Counter)  # ended requests by code
    preemptions: int = 0
    admitted_per_rank: Counter = field(default_factory=Counter)
    # (iteration seconds, seconds of it outside the forward and the sampling: planning, applying, events, and
    # with several ranks the plan broadcast and outcome gather) for the latest iterations
    recent_steps: deque = field(default_factory=lambda: deque(maxlen=4096))
    # With expert ranks: (exchange seconds, imbalance: the mean over layers of max / mean rows per expert rank)
    # for the latest iterations that exchanged rows, and rows sent to each expert rank in all
    recent_exchanges: deque = field(default_factory=lambda: deque(maxlen=4096))
    expert_rows: Counter = field(default_factory=Counter)
    # The prefix cache, over all ranks: lookups, hits, prompt tokens reused, entries stored and evicted; entries
    # held and the bytes they reserve in the budget
    prefix: PrefixStats = field(default_factory=PrefixStats)
    prefix_entries: int = 0
    prefix_bytes: int = 0

    def record(self, out: StepOutcome, step_s: float) -> None:
        """One iteration: its latency, its control share, and the forward time split by row kind."""
        self.iterations += 1
        self.step_s_total += step_s
        self.recent_steps.append((step_s, max(0.0, step_s - out.forward_s - out.sampling_s - out.vision_s)))
        self.canvases_last_step = len(out.canvases)
        self.canvas_steps += len(out.canvases)
        total_rows = sum(out.rows.values()) or 1
        for kind, n in out.rows.items():
            self.time_s[kind] += out.forward_s * n / total_rows
        self.time_s["sampling"] += out.sampling_s
        self.time_s["vision"] += out.vision_s
        self.images += out.images
        self.kv_bytes = out.kv_bytes
        if any(any(layer) for layer in out.expert_rows):
            self.recent_exchanges.append((out.exchange_s, imbalance(out.expert_rows)))
            for layer in out.expert_rows:
                for j, n in enumerate(layer):
                    self.expert_rows[j] += n

    def step_summary(self) -> dict:
        steps = [s for s, _ in self.recent_steps]
        if not steps:
            return {"steps": 0}
        out = {"steps": len(steps), "step_s_p50": percentile(steps, 0.5), "step_s_p99": percentile(steps, 0.99),
               "control_s_mean": sum(c for _, c in self.recent_steps) / len(steps),
               "step_s_mean": sum(steps) / len(steps)}
        if self.recent_exchanges:
            n = len(self.recent_exchanges)
            out |= {"exchange_s_mean": sum(e for e, _ in self.recent_exchanges) / n,
                    "expert_imbalance_mean": sum(i for _, i in self.recent_exchanges) / n,
                    "expert_rows": dict(self.expert_rows)}
        return out
