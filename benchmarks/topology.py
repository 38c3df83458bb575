"""Which profile (replicated, packed, disaggregated) serves the real model fastest: a planner that predicts step
time and tokens per second from per-layer compute times and link figures, checked against measured CPU splits.

1. CPU check (measured here). One MoE layer of `benchmarks/moe_layer.py`'s CPU config (32 experts top-4, hidden
   512, width 256, float32, every process 1 torch thread) is measured in parts, each in isolation: the
   co-located layer (`LocalExperts`); the attention rank's own work in the split (`AllToAllExperts` with its
   collectives stubbed out: routing order, gathers, un-permute, weighted sum); each expert rank's work on exactly
   the rows it would receive (`ExpertServer.run`); and the gloo all-to-all over 1 + E ranks (the start-up
   self-test's sweep, `cluster/experts/selftest.py`), fitted robustly as latency + bytes / busbw. From these the
   planner predicts the split layer (1 attention rank + E = 2 and 4 expert ranks):
       attention + max(slowest expert rank, all expert ranks' work / cores)
       + 4 collectives x latency + (rows + metadata + outputs bytes) / loopback rate,
   the expert ranks computing in parallel only up to the cores this machine has (`--cores`; 1 + E processes
   oversubscribe a small machine), and the loopback rate n x busbw / min(n, cores) (on loopback the "link" is
   the cores copying: a byte is copied by its sender, then by its receiver). Then it measures the split with
   moe_layer's machinery (spawned gloo ranks; the median of 3 runs, each the median of --iters calls) and
   reports prediction_error = |predicted - measured| / measured per config (target at most 0.25; a missed target
   is printed, not an exit status).
2. H100 prediction (predicted, not measured). For the real model (MODEL_SPEC: hidden 2816, 30 layers, 128
   experts top-8 of width 704, bf16 weights) on H100 (HBM 3.35 TB/s, BF16 989 TFLOP/s at --mfu, NVLink 450 GB/s
   and InfiniBand 50 GB/s per direction per GPU; all flags, and `--link-json` takes a measured sweep) it
   predicts per profile the step time, tokens/s per request and per GPU, and the memory per GPU, at batch 1, 16
   and 64 canvases per engine unit, and says which profile wins and why. Per layer: attention part (weights and
   KV bytes / HBM, or FLOPs / (peak x mfu), whichever is larger), expert part (the touched experts' bytes split
   over E expert ranks, or their FLOPs), exchange (dispatch + combine rows over the link + latency per
   collective; 0 for replicated). Step = layers x (attention + experts + exchange) + LM head and
   self-conditioning; no overlap of exchange and compute (ping-pong micro-batching is not built yet).

What one machine cannot do: NCCL runs one rank per GPU, so the split cannot run on a machine with fewer than
1 + E GPUs, and no H100 is measured here: the H100 table is the planner's prediction from datasheet figures (or
your `--link-json` measurement). On a GPU machine `--device cuda` measures the co-located part the GPU can run,
one expert layer of the real model (bf16, all 128 experts, random weights) per batch, and the planner uses it for
the expert part (an expert rank: 1/E of it) and predicts the rest; the output says which parts are measured. On
CPU the split is measured over gloo on loopback, where the "link" is this machine's cores copying bytes.

    python benchmarks/topology.py --quick
    python benchmarks/topology.py --json --link-json a2a.json --link-json-for nvlink
    python benchmarks/topology.py --quick --device cuda      # a GPU machine
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import all_to_all, common, moe_layer  # noqa: E402
from dgserve.model.tiny import REAL_SHAPES  # noqa: E402

TARGET_ERROR = 0.25
BATCHES = (1, 16, 64)
RUNS = 3  # measured runs of each split (the median is reported)
SWEEP_ITERS = 30  # timed calls per size of the link sweep (a few ms each on CPU)
COLLECTIVES_PER_LAYER = 4  # counts, rows, row metadata, outputs (cluster/experts/exchange.py)
META_BYTES_PER_ASSIGNMENT = 16  # two int64 per (row, expert): the expert's local index and a group tag
GB = 1e9
GIB = 1 << 30

# ----------------------------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Gpu:
    """One GPU's figures (H100 SXM5 datasheet: SERVING_ANCHORS.md section 7)."""

    hbm_bytes_per_s: float = 3.35e12
    flops_per_s: float = 989e12  # dense BF16 peak
    mfu: float = 0.6  # share of the peak a real kernel reaches (SERVING_ANCHORS: "a realistic 60% MFU")
    memory_bytes: float = 80 * GIB

    def time(self, nbytes: float, flops: float) -> float:
        """Roofline: the larger of the memory time and the compute time."""
        return max(nbytes / self.hbm_bytes_per_s, flops / (self.flops_per_s * self.mfu))


@dataclass(frozen=True)
class Link:
    """A link between ranks: bandwidth per direction per GPU and the cost of one collective."""

    name: str
    bytes_per_s: float
    latency_s: float

    def time(self, nbytes: float, collectives: int) -> float:
        return collectives * self.latency_s + nbytes / self.bytes_per_s


NVLINK = Link("NVLink", 450e9, 20e-6)
INFINIBAND = Link("InfiniBand", 50e9, 40e-6)
REAL = REAL_SHAPES


@dataclass(frozen=True)
class ModelDims:
    """The real model (MODEL_SPEC section 2, as `model.tiny.REAL_SHAPES` holds it; parameter counts as
    SERVING_ANCHORS section 7 derives them)."""

    hidden: int = REAL.hidden_size
    layers: int = REAL.num_hidden_layers
    experts: int = REAL.num_experts
    top_k: int = REAL.top_k_experts
    expert_width: int = REAL.moe_intermediate_size
    dense_width: int = REAL.intermediate_size
    vocab: int = REAL.vocab_size
    heads: int = REAL.num_attention_heads
    sliding_layers: int = REAL.num_hidden_layers - REAL.num_hidden_layers // REAL.full_every
    sliding_head_dim: int = REAL.head_dim
    sliding_kv_heads: int = REAL.num_key_value_heads
    full_head_dim: int = REAL.global_head_dim
    full_kv_heads: int = REAL.num_global_key_value_heads
    window: int = REAL.sliding_window
    canvas: int = REAL.canvas_length
    vision_params: float = 0.573e9
    weight_bytes: int = 2  # bf16 weights
    act_bytes: int = 2  # bf16 rows in the exchange and KV
    sampler: str = "fused"  # engine.sampler on CUDA by default (the canvas workspace below)

    @property
    def full_layers(self) -> int:
        return self.layers - self.sliding_layers

    @property
    def expert_params(self) -> int:
        """One expert: gate_up [2I, D] + down [D, I]."""
        return 3 * self.hidden * self.expert_width

    @property
    def attention_params_per_layer(self) -> float:
        """q, k, v, o projections, averaged over sliding and full layers (full layers have no v_proj)."""
        H, nh = self.hidden, self.heads
        s = H * nh * self.sliding_head_dim * 2 + 2 * H * self.sliding_kv_heads * self.sliding_head_dim
        f = H * nh * self.full_head_dim * 2 + H * self.full_kv_heads * self.full_head_dim
        return (s * self.sliding_layers + f * self.full_layers) / self.layers

    @property
    def dense_params_per_layer(self) -> float:
        """Attention projections, the dense ("shared") MLP and the router: what an attention rank holds per layer."""
        return self.attention_params_per_layer + 3 * self.hidden * self.dense_width + self.experts * self.hidden

    @property
    def head_params(self) -> int:
        """The tied embedding / LM head."""
        return self.vocab * self.hidden

    def kv_bytes_per_layer(self, context: int) -> float:
        """KV bytes one canvas reads per layer (averaged): sliding layers the last window - 1 tokens, full layers
        the whole context, plus the canvas's own 256 keys and values."""
        s = (min(context, self.window - 1) + self.canvas) * 2 * self.sliding_kv_heads * self.sliding_head_dim
        f = (context + self.canvas) * 2 * self.full_kv_heads * self.full_head_dim
        return (s * self.sliding_layers + f * self.full_layers) * self.act_bytes / self.layers

    def kv_bytes_held(self, context: int) -> float:
        """KV bytes one request holds after `context` positions."""
        s = min(context, self.window - 1) * 2 * self.sliding_kv_heads * self.sliding_head_dim * self.sliding_layers
        f = context * 2 * self.full_kv_heads * self.full_head_dim * self.full_layers
        return (s + f) * self.act_bytes

    def attention_core_flops_per_layer(self, context: int) -> float:
        """QK^T and PV for one canvas (4 x heads x head_dim per query-key pair), averaged over layers."""
        C = self.canvas
        s = 4 * self.heads * self.sliding_head_dim * C * (min(context, self.window - 1) + C)
        f = 4 * self.heads * self.full_head_dim * C * (context + C)
        return (s * self.sliding_layers + f * self.full_layers) / self.layers

    @property
    def canvas_workspace_bytes(self) -> float:
        """What a canvas holds between and during steps. Fused sampler: its bf16 self-conditioning input and the
        fused vocabulary pass's split workspace (kernels/vocab, about 12 MB). Exact sampler: [C, V] float32 noise
        (cluster/engine/budget.py) plus the step's [C, V] float32 logits."""
        if self.sampler == "fused":
            from dgserve.kernels.vocab.sizes import triton_workspace_bytes

            return self.canvas * self.hidden * self.act_bytes + triton_workspace_bytes(self.canvas, self.hidden)
        return 2 * self.canvas * self.vocab * 4 + self.canvas * self.hidden * 4


def touched_experts(tokens: int, experts: int, top_k: int) -> float:
    """Expected distinct experts `tokens` rows reach under uniform independent top-k routing."""
    return experts * (1 - (1 - top_k / experts) ** tokens)


# ----------------------------------------------------------------------------------------------- planner


@dataclass(frozen=True)
class Profile:
    """An engine unit's ranks: A attention ranks and E expert ranks (E = 0: every rank holds every expert)."""

    name: str
    attention_ranks: int
    expert_ranks: int
    link: Link | None = None  # between attention and expert ranks

    @property
    def gpus(self) -> int:
        return self.attention_ranks + self.expert_ranks


@dataclass(frozen=True)
class Workload:
    batch: int  # canvases in flight in one engine unit
    context: int = 4096  # positions in each request's KV cache
    steps_per_block: int = 16  # denoise steps per 256-token block (Google: typically 12-16)

    @property
    def forwards_per_block(self) -> int:
        """The denoise steps plus the commit pass (a causal pass over the block that writes its KV)."""
        return self.steps_per_block + 1


@dataclass(frozen=True)
class Prediction:
    profile: str
    batch: int
    gpus: int
    attention_s: float  # per step, all layers (on the busiest attention rank)
    experts_s: float  # per step, all layers (on one expert rank)
    exchange_s: float  # per step, all layers
    head_s: float  # per step: LM head and self-conditioning matmuls
    tokens_per_forward: float  # per request
    memory_bytes: float  # on the fullest GPU
    fits: bool
    experts_measured: bool = False  # experts_s from a measured co-located layer (else the roofline)

    @property
    def step_s(self) -> float:
        return self.attention_s + self.experts_s + self.exchange_s + self.head_s

    @property
    def tokens_per_s_request(self) -> float:
        return self.tokens_per_forward / self.step_s

    @property
    def tokens_per_s_gpu(self) -> float:
        return self.batch * self.tokens_per_s_request / self.gpus

    def as_json(self) -> dict:
        return asdict(self) | {"step_s": self.step_s, "tokens_per_s_request": self.tokens_per_s_request,
                               "tokens_per_s_gpu": self.tokens_per_s_gpu}


def attention_layer_s(dims: ModelDims, gpu: Gpu, canvases: int, context: int) -> float:
    """One layer's attention part for `canvases` canvases on one GPU: its weights and KV reads, or its FLOPs."""
    if canvases == 0:
        return 0.0
    tokens = canvases * dims.canvas
    nbytes = dims.dense_params_per_layer * dims.weight_bytes + canvases * dims.kv_bytes_per_layer(context)
    flops = 2 * tokens * dims.dense_params_per_layer + canvases * dims.attention_core_flops_per_layer(context)
    return gpu.time(nbytes, flops)


def expert_layer_s(dims: ModelDims, gpu: Gpu, canvases: int, expert_ranks: int) -> float:
    """One layer's routed experts for all `canvases` on one of `expert_ranks` GPUs (1: all experts on one GPU):
    each rank reads its share of the touched experts' weights and runs its share of the rows (balanced)."""
    tokens = canvases * dims.canvas
    ranks = max(1, expert_ranks)
    nbytes = touched_experts(tokens, dims.experts, dims.top_k) * dims.expert_params * dims.weight_bytes / ranks
    flops = 2 * tokens * dims.top_k * dims.expert_params / ranks
    return gpu.time(nbytes, flops)


def exchange_layer_s(dims: ModelDims, profile: Profile, canvases: int) -> float:
    """One layer's dispatch and combine: each attention rank sends its rows x top-k (one copy per (row, expert),
    no de-duplication per destination) and gets as many back; an expert rank receives its share of everyone's.
    Each direction takes the busier side's bytes over the link, plus COLLECTIVES_PER_LAYER latencies."""
    if profile.expert_ranks == 0 or profile.link is None:
        return 0.0
    row_bytes = dims.hidden * dims.act_bytes + META_BYTES_PER_ASSIGNMENT / 2  # metadata only in the dispatch
    per_attention = math.ceil(canvases / profile.attention_ranks) * dims.canvas * dims.top_k * row_bytes
    per_expert = canvases * dims.canvas * dims.top_k * row_bytes / profile.expert_ranks
    return profile.link.time(2 * max(per_attention, per_expert), COLLECTIVES_PER_LAYER)


def head_s(dims: ModelDims, gpu: Gpu, canvases: int) -> float:
    """LM head and the self-conditioning matmul (probs @ embedding): two vocab-sized GEMMs per step, each reading
    the bf16 embedding."""
    if canvases == 0:
        return 0.0
    tokens = canvases * dims.canvas
    return gpu.time(2 * dims.head_params * dims.weight_bytes, 2 * 2 * tokens * dims.head_params)


def memory_per_gpu(dims: ModelDims, profile: Profile, canvases: int, context: int) -> float:
    """Bytes on the fullest GPU: weights held plus each of its canvases' KV and workspace."""
    per_canvas = dims.kv_bytes_held(context) + dims.canvas_workspace_bytes
    attention_weights = (dims.dense_params_per_layer * dims.layers + dims.head_params + dims.vision_params)
    experts = dims.experts * dims.expert_params * dims.layers
    b = math.ceil(canvases / profile.attention_ranks)
    if profile.expert_ranks == 0:
        return (attention_weights + experts) * dims.weight_bytes + b * per_canvas
    attention = attention_weights * dims.weight_bytes + b * per_canvas
    return max(attention, experts * dims.weight_bytes / profile.expert_ranks)


def predict(dims: ModelDims, gpu: Gpu, profile: Profile, work: Workload,
            measured_experts: Mapping[int, float] | None = None) -> Prediction:
    """A denoise step of `work.batch` canvases in one engine unit of `profile`; the attention ranks share the
    canvases (data parallel), the busiest one sets the pace. `measured_experts`: canvases -> seconds of one
    co-located expert layer (all experts on one GPU), measured; an expert rank then takes 1/E of it."""
    b = math.ceil(work.batch / profile.attention_ranks)
    canvases = work.batch if profile.expert_ranks else b
    measured = (measured_experts or {}).get(canvases)
    if measured is None:
        experts = expert_layer_s(dims, gpu, canvases, profile.expert_ranks)
    else:
        experts = measured / max(1, profile.expert_ranks)
    mem = memory_per_gpu(dims, profile, work.batch, work.context)
    return Prediction(profile.name, work.batch, profile.gpus,
                      attention_s=dims.layers * attention_layer_s(dims, gpu, b, work.context),
                      experts_s=dims.layers * experts,
                      exchange_s=dims.layers * exchange_layer_s(dims, profile, work.batch),
                      head_s=head_s(dims, gpu, b), tokens_per_forward=dims.canvas / work.forwards_per_block,
                      memory_bytes=mem, fits=mem <= gpu.memory_bytes, experts_measured=measured is not None)


PARTS = ("experts", "attention", "exchange", "head")


def largest_fitting_batch(dims: ModelDims, gpu: Gpu, profile: Profile, context: int, limit: int = 4096) -> int:
    """The most canvases one engine unit of `profile` holds within its GPUs' memory (0: not even one)."""
    fits = [b for b in range(1, limit + 1) if memory_per_gpu(dims, profile, b, context) <= gpu.memory_bytes]
    return max(fits, default=0)


def reasons(preds: Sequence[Prediction], fallback: dict[str, Prediction] | None = None) -> list[str]:
    """Which profile wins per request and per GPU (among those that fit), and why, from the numbers. `fallback`:
    a profile that does not fit, predicted at its largest batch that does."""
    fallback = fallback or {}
    fit = [p for p in preds if p.fits]
    out = []
    for p in preds:
        if not p.fits:
            line = (f"{p.profile} does not fit {p.batch} canvases: {p.memory_bytes / GIB:.0f} GiB on its fullest GPU "
                    f"(weights + each canvas's KV and workspace)")
            if (f := fallback.get(p.profile)) is not None:
                line += (f"; at its largest batch that fits ({f.batch}) it gives {f.tokens_per_s_request:,.0f} tok/s "
                         f"per request, {f.tokens_per_s_gpu:,.0f} per GPU")
            out.append(line)
    if not fit:
        return out + ["no profile fits"]
    fast = max(fit, key=lambda p: p.tokens_per_s_request)
    options = fit + list(fallback.values())  # a profile that does not fit runs in smaller units
    cheap = max(options, key=lambda p: p.tokens_per_s_gpu)
    out.append(f"per request: {fast.profile} wins, {fast.tokens_per_s_request:,.0f} tok/s (step "
               f"{fast.step_s * 1e3:.1f} ms: {breakdown(fast)})")
    out += [f"  {why(fast, p)}" for p in fit if p is not fast]
    unit = f" in units of {cheap.batch} canvases" if cheap.batch < fast.batch else ""
    line = (f"per GPU: {cheap.profile}{unit} wins, {cheap.tokens_per_s_gpu:,.0f} tok/s per GPU"
            + "".join(f"; {p.profile} {p.tokens_per_s_gpu:,.0f}" for p in fit if p is not cheap))
    if cheap is not fast and cheap.batch == fast.batch:
        line += (f" ({fast.profile}'s step is {cheap.step_s / fast.step_s:.1f}x shorter than {cheap.profile}'s on "
                 f"{fast.gpus / cheap.gpus:.0f}x the GPUs)")
    out.append(line)
    return out


def breakdown(p: Prediction) -> str:
    parts = {k: getattr(p, f"{k}_s") for k in PARTS}
    return ", ".join(f"{k} {v / p.step_s:.0%}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v)


def why(winner: Prediction, other: Prediction) -> str:
    """How the winner's step differs from another profile's, the largest differences first."""
    diffs = {k: getattr(winner, f"{k}_s") - getattr(other, f"{k}_s") for k in PARTS}
    terms = ", ".join(f"{k} {v * 1e3:+.1f} ms" for k, v in sorted(diffs.items(), key=lambda kv: -abs(kv[1]))
                      if abs(v) >= 5e-5)
    return (f"vs {other.profile} ({other.step_s * 1e3:.1f} ms; {breakdown(other)}): "
            f"{(winner.step_s - other.step_s) * 1e3:+.1f} ms per step = {terms or 'no difference'}")


# ----------------------------------------------------------------------------------------------- links


@dataclass(frozen=True)
class LinkFit:
    """time = latency + crossing bytes / bandwidth per rank, fitted to a sweep's rows over `ranks` ranks."""

    latency_s: float
    bytes_per_s: float
    ranks: int
    rows: int

    def link(self, name: str) -> Link:
        """As a GPU link: every rank has its own (NVLink, a NIC per GPU)."""
        return Link(name, self.bytes_per_s, self.latency_s)

    def loopback_bytes_per_s(self, cores: int) -> float:
        """What the split's rows cross at when the "link" is this machine's cores copying bytes (gloo over
        loopback). A byte is copied by its sender and by its receiver; in the sweep all n ranks copy at once on
        min(n, cores) cores, so a core copies c = 2 n busbw / min(n, cores) bytes per second, while in the split
        one rank sends every row and a receiver copies it in after it: c / 2 = n busbw / min(n, cores)."""
        return self.bytes_per_s * self.ranks / min(self.ranks, max(1, cores))


def fit_link(rows: Sequence[dict]) -> LinkFit:
    """Theil-Sen (the median of the pairwise slopes, robust to a noisy row or two) over all_to_all.py / selftest
    rows (or nccl-tests rows), in the bytes that cross the link per rank (size x busbw / algbw = size x (n - 1) /
    n); the latency is the median intercept. Without a positive slope: the best busbw and the fastest row."""
    if not rows:
        raise ValueError("no all-to-all rows to fit")
    share = statistics.median(r["busbw_gbs"] / r["algbw_gbs"] for r in rows)  # (n - 1) / n
    ranks = round(1 / (1 - share)) if share < 1 else 1
    xs = [r["bytes"] * r["busbw_gbs"] / r["algbw_gbs"] for r in rows]
    ts = [r["time_us"] * 1e-6 for r in rows]
    slopes = [(ts[j] - ts[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs))
              if xs[j] != xs[i]]
    slope = statistics.median(slopes) if slopes else 0.0
    if slope <= 0:
        return LinkFit(min(ts), max(r["busbw_gbs"] for r in rows) * GB, ranks, len(rows))
    latency = statistics.median(t - slope * x for x, t in zip(xs, ts, strict=True))
    return LinkFit(max(0.0, latency), 1 / slope, ranks, len(rows))


def read_link_json(path: Path) -> list[dict]:
    """Rows from `benchmarks/all_to_all.py --json` (nccl-tests' rows win when present), or a bare list of rows
    (a unit's start-up self-test)."""
    data = json.loads(path.read_text().strip().splitlines()[-1])
    rows = data["rows"] if isinstance(data, dict) else data
    nccl = [r for r in rows if r.get("source") == "nccl-tests"]
    return nccl or rows


# ----------------------------------------------------------------------------------------------- CPU check


@dataclass(frozen=True)
class SplitParts:
    """One split layer measured in parts (seconds), and its bytes over the link."""

    expert_ranks: int
    attention_s: float
    expert_s: tuple[float, ...]  # each expert rank's work on its rows
    rows: tuple[int, ...]  # (row, expert) assignments each expert rank receives
    exchange_bytes: int  # through the attention rank: rows out, their metadata, outputs back


def predict_split(parts: SplitParts, link: LinkFit, cores: int) -> dict:
    """The split layer's time on this machine: the phases run one after the other; the expert ranks run in
    parallel up to `cores` cores (beyond that they share them); the bytes cross at the loopback rate."""
    experts = max(max(parts.expert_s), sum(parts.expert_s) / max(1, cores))
    exchange = (COLLECTIVES_PER_LAYER * link.latency_s
                + parts.exchange_bytes / link.loopback_bytes_per_s(cores))
    return {"attention_s": parts.attention_s, "experts_s": experts, "exchange_s": exchange,
            "seconds": parts.attention_s + experts + exchange}


def prediction_error(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured


def _stub_collectives(sent: deque):
    """The attention rank's collectives replaced by stand-ins that move nothing (what it sends lands in `sent`):
    what remains is its own work."""
    import torch

    from dgserve.cluster.experts import exchange

    def counts(send, group):
        return torch.zeros_like(send)

    def rows(x, send, recv, group):
        sent.append((x, list(send)))
        return torch.zeros((sum(recv), *x.shape[1:]), dtype=x.dtype)

    return mock.patch.multiple(exchange, exchange_counts=counts, exchange=rows)


def measure_parts(args, e: int, inputs) -> SplitParts:
    """The attention rank's work and each expert rank's work for a split over `e` expert ranks, in this process."""
    from dgserve.cluster.experts.exchange import AllToAllExperts, ExpertServer, Roles
    from dgserve.cluster.experts.partition import ExpertPartition
    from dgserve.model.moe import ExpertWeights

    w, rows, ids, weights, layout = inputs
    roles, part = Roles(1, e), ExpertPartition.balanced(args.experts, e)
    backend, sent = AllToAllExperts(part, roles), deque(maxlen=3)
    with _stub_collectives(sent):
        attention_s, _ = moe_layer.timed(lambda: backend(0, rows, ids, weights, layout), args.iters, args.warmup)
    (x, send), (meta, _), _ = sent  # rows, their metadata, the (empty) request for the outputs
    expert_s, start = [], send[0]
    for j in range(e):
        n, mine = send[1 + j], list(part.experts_of(j))
        server = ExpertServer([ExpertWeights(w.gate_up[mine].clone(), w.down[mine].clone())], roles)
        xj, mj, recv = x[start:start + n], meta[start:start + n], [n] + [0] * e
        call = lambda s=server, a=xj, b=mj, r=recv: s.run(0, a, b, r)  # noqa: E731
        expert_s.append(moe_layer.timed(call, args.iters, args.warmup)[0])
        start += n
    nbytes = x.numel() * x.element_size() + meta.numel() * meta.element_size() + x.numel() * x.element_size()
    return SplitParts(e, attention_s, tuple(expert_s), tuple(send[1:]), nbytes)


@contextlib.contextmanager
def torch_threads(n: int):
    """This process at `n` torch threads (as every rank of the split: 1), restored on the way out; RowLayout's
    small-group bound follows the thread count, so the parts do the split's very work."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def co_located_s(args, inputs) -> float:
    from dgserve.model.moe import LocalExperts

    experts = LocalExperts([inputs[0]])
    return moe_layer.timed(lambda: experts(0, *inputs[1:]), args.iters, args.warmup)[0]


def sweep_sizes(exchange_bytes: int, ranks: int) -> list[int]:
    """Sizes from 4 KiB to the split's largest single collective (doubling), as all_to_all.py sweeps them."""
    top = 1 << max(12, math.ceil(math.log2(max(1, exchange_bytes // 2))))
    return all_to_all.sizes(4096, top, ranks)


def measure_split(args, e: int) -> float:
    """One run of the split layer (moe_layer's ranks): the median of --iters calls."""
    with tempfile.TemporaryDirectory(prefix="dgserve-topology-") as tmp:
        store = os.path.join(tmp, "store")
        return moe_layer.run(moe_layer._rank_main, [(r, 1 + e, args, store) for r in range(1 + e)])["seconds"]


def cpu_run(args, inputs, e: int) -> dict:
    """One run for E expert ranks, back to back so that both see the same machine: the parts (this process, 1
    torch thread), the link sweep over 1 + E ranks, the prediction, then the measured split."""
    with torch_threads(1):
        parts = measure_parts(args, e, inputs)
    link = fit_link(all_to_all.measure(1 + e, "gloo", sweep_sizes(parts.exchange_bytes, 1 + e), SWEEP_ITERS,
                                       args.warmup))
    pred = predict_split(parts, link, args.cores)
    measured = measure_split(args, e)
    return {"predicted_s": pred["seconds"], "predicted": pred, "measured_s": measured,
            "prediction_error": prediction_error(pred["seconds"], measured), "parts": asdict(parts),
            "link": asdict(link), "loopback_bytes_per_s": link.loopback_bytes_per_s(args.cores)}


def cpu_check(args) -> dict:
    """RUNS runs of every config; per config the median prediction against the median measurement."""
    inputs = moe_layer.layer_inputs(args)
    with torch_threads(1):
        co = [co_located_s(args, inputs) for _ in range(RUNS)]
    configs = {}
    for e in args.splits:
        runs = [cpu_run(args, inputs, e) for _ in range(RUNS)]
        predicted, measured = common.spread([r["predicted_s"] for r in runs]), common.spread(
            [r["measured_s"] for r in runs])
        err = prediction_error(predicted["median"], measured["median"])
        configs[f"E={e}"] = {"expert_ranks": e, "processes": 1 + e, "predicted_s": predicted["median"],
                             "predicted_spread": predicted, "measured_s": measured["median"],
                             "measured_spread": measured, "prediction_error": err, "target_met": err <= TARGET_ERROR,
                             "median_run": common.median_run(runs, "predicted_s"), "runs": runs}
    return {"co_located_s": common.spread(co)["median"], "configs": configs}


def cpu_lines(args, check: dict) -> list[str]:
    head = ("config", "processes", "attention ms", "experts ms", "exchange ms", "predicted ms", "measured ms",
            "measured min-max", "prediction_error", "per run")
    cells = [head, ("co-located", "1", "-", "-", "-", "-", f"{check['co_located_s'] * 1e3:.2f}", "-", "-", "-")]
    for name, c in check["configs"].items():
        p, s = c["median_run"]["predicted"], c["measured_spread"]
        cells.append((f"split {name}", str(c["processes"]), f"{p['attention_s'] * 1e3:.2f}",
                      f"{p['experts_s'] * 1e3:.2f}", f"{p['exchange_s'] * 1e3:.2f}", f"{c['predicted_s'] * 1e3:.2f}",
                      f"{c['measured_s'] * 1e3:.2f}", f"{s['min'] * 1e3:.2f}-{s['max'] * 1e3:.2f}",
                      f"{c['prediction_error']:.3f}", " ".join(f"{r['prediction_error']:.2f}" for r in c["runs"])))
    links = "; ".join(f"{n}: {r['link']['latency_s'] * 1e6:.0f} us per collective, busbw "
                      f"{r['link']['bytes_per_s'] / GB:.2f} GB/s over {c['processes']} ranks -> the split's rows at "
                      f"{r['loopback_bytes_per_s'] / GB:.2f} GB/s"
                      for n, c in check["configs"].items() for r in [c["median_run"]])
    met = all(c["target_met"] for c in check["configs"].values())
    return ([f"CPU check: one MoE layer, {args.rows} rows in {args.items} items, {args.experts} experts "
             f"top-{args.top_k}, hidden {args.hidden}, width {args.expert_width}, float32; every process 1 torch "
             f"thread (co-located: 1 process; split E: 1 + E processes), {args.cores} cores assumed for the expert "
             f"ranks ({os.cpu_count()} cpus); {RUNS} runs of each config, each run the parts, the link sweep and "
             f"the split back to back; ms: median of the runs (the parts: the median run's), each run the median "
             f"of {args.iters} calls"]
            + common.table(cells)
            + [f"  gloo all-to-all fit (loopback, median run): {links}",
               f"  target prediction_error <= {TARGET_ERROR}: target met: {'yes' if met else 'no'}"])


# ----------------------------------------------------------------------------------------------- one GPU


def measure_expert_layer(dims: ModelDims, canvases: int, device: str, dtype: str, iters: int, warmup: int) -> float:
    """Seconds of one co-located expert layer (`LocalExperts`, every expert on this device; random weights and
    routing) for `canvases` canvases at `dims`: what one GPU measures of the split's parts (an expert rank holds
    1/E of the experts and runs 1/E of the rows: the planner divides)."""
    import torch

    from dgserve.model.moe import ExpertWeights, LocalExperts

    dt, dev = getattr(torch, dtype), torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    H, I, E, T = dims.hidden, dims.expert_width, dims.experts, canvases * dims.canvas

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dt)

    w = ExpertWeights(randn(E, 2 * I, H, scale=H ** -.5), randn(E, H, I, scale=I ** -.5))
    rows = randn(T, H)
    ids = torch.rand(T, E, generator=g, device=dev).topk(dims.top_k, dim=-1).indices
    weights = torch.rand(T, dims.top_k, generator=g, device=dev)
    experts = LocalExperts([w])

    def call() -> None:
        experts(0, rows, ids, weights)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    return moe_layer.timed(call, iters, warmup)[0]


def gpu_lines(dims: ModelDims, gpu: Gpu, measured: Mapping[int, float], name: str) -> list[str]:
    cells = [("canvases", "measured ms per layer", "roofline ms per layer", "measured / roofline")]
    for b, sec in measured.items():
        roof = expert_layer_s(dims, gpu, b, 1)
        cells.append((str(b), f"{sec * 1e3:.3f}", f"{roof * 1e3:.3f}", f"{sec / roof:.2f}"))
    return [f"{name}: one co-located expert layer of the real model (all {dims.experts} experts, bf16, today's "
            f"kernels) measured; the split itself is not (NCCL runs one rank per GPU: it needs 1 + E GPUs), so the "
            f"planner predicts it from these times and the link figures"] + common.table(cells)


# ----------------------------------------------------------------------------------------------- H100 table


def h100_profiles(nvlink: Link, ib: Link) -> list[Profile]:
    """The shipped topologies (cluster/topologies/h100-*.yaml)."""
    return [Profile("replicated", 1, 0), Profile("packed", 2, 6, nvlink), Profile("disaggregated", 4, 8, ib)]


def h100_table(dims: ModelDims, gpu: Gpu, profiles: Sequence[Profile], batches: Sequence[int], context: int,
               steps: int, measured_experts: Mapping[int, float] | None = None) -> tuple[list[str], dict]:
    lines, out = [], {}
    head = ("batch", "profile", "GPUs", "step ms", "attention", "experts", "exchange", "head", "tok/s/request",
            "tok/s/GPU", "GiB/GPU")
    for b in batches:
        preds = [predict(dims, gpu, p, Workload(b, context, steps), measured_experts) for p in profiles]
        fallback = {}  # a profile that does not fit b canvases, at the largest batch that fits
        for p, pred in zip(profiles, preds, strict=True):
            if not pred.fits and (n := largest_fitting_batch(dims, gpu, p, context)):
                fallback[p.name] = predict(dims, gpu, p, Workload(n, context, steps), measured_experts)
        cells = [head] + [(str(b), p.profile, str(p.gpus), f"{p.step_s * 1e3:.1f}", f"{p.attention_s * 1e3:.1f}",
                           f"{p.experts_s * 1e3:.1f}", f"{p.exchange_s * 1e3:.1f}", f"{p.head_s * 1e3:.1f}",
                           f"{p.tokens_per_s_request:,.0f}", f"{p.tokens_per_s_gpu:,.0f}",
                           f"{p.memory_bytes / GIB:.0f}{'' if p.fits else ' (no fit)'}") for p in preds]
        lines += common.table(cells) + [f"    {r}" for r in reasons(preds, fallback)]
        out[str(b)] = [p.as_json() for p in preds]
    return lines, out


def h100_header(dims: ModelDims, gpu: Gpu, profiles: Sequence[Profile], context: int, steps: int,
                gpus_here: int, experts_from: str) -> list[str]:
    links = ", ".join(f"{p.name} {p.attention_ranks}+{p.expert_ranks} over {p.link.name} "
                      f"{p.link.bytes_per_s / GB:.0f} GB/s + {p.link.latency_s * 1e6:.0f} us per collective"
                      for p in profiles if p.link)
    return [f"H100 prediction (not measured): the real model, bf16 weights, hidden {dims.hidden}, {dims.layers} "
            f"layers, {dims.experts} experts top-{dims.top_k}; HBM {gpu.hbm_bytes_per_s / 1e12:.2f} TB/s, BF16 "
            f"{gpu.flops_per_s / 1e12:.0f} TFLOP/s x mfu {gpu.mfu}, {gpu.memory_bytes / GIB:.0f} GiB per GPU",
            f"  profiles: replicated 1 GPU; {links}",
            f"  context {context} positions per request; {steps} denoise steps + 1 commit pass per 256-token block "
            f"= {dims.canvas / (steps + 1):.1f} tokens per forward per request; times per step, all layers, "
            f"no overlap of exchange and compute; batch = canvases per engine unit, spread over its attention "
            f"ranks",
            f"  expert part: {experts_from}; NCCL runs one rank per GPU, so the split needs 1 + E GPUs: this "
            f"machine has {gpus_here}, and the split's rows are the planner's"]


# ----------------------------------------------------------------------------------------------- main

def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    moe_layer.add_layer_flags(p)  # the CPU check's layer and workload
    p.add_argument("--splits", type=int, nargs="+", default=[2, 4], help="expert ranks of the CPU splits")
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                   help="cores the expert ranks can run on at once (default: this process's cpus)")
    p.add_argument("--skip-cpu-check", action="store_true", help="only the H100 prediction")
    p.add_argument("--device", default="cpu",
                   help="cuda: also measure one co-located expert layer of the real model per batch on this GPU "
                        "(bf16) and use it for the expert part of the H100 table")
    g = p.add_argument_group("H100 prediction")
    g.add_argument("--hbm-gbs", type=float, default=3350.0)
    g.add_argument("--tflops", type=float, default=989.0, help="dense BF16 peak")
    g.add_argument("--mfu", type=float, default=0.6, help="share of the peak the GEMMs reach")
    g.add_argument("--gpu-gib", type=float, default=80.0)
    g.add_argument("--nvlink-gbs", type=float, default=NVLINK.bytes_per_s / GB, help="per direction per GPU")
    g.add_argument("--nvlink-latency-us", type=float, default=NVLINK.latency_s * 1e6, help="per collective")
    g.add_argument("--ib-gbs", type=float, default=INFINIBAND.bytes_per_s / GB, help="per direction per GPU")
    g.add_argument("--ib-latency-us", type=float, default=INFINIBAND.latency_s * 1e6, help="per collective")
    g.add_argument("--link-json", type=Path,
                   help="all_to_all.py --json output (nccl-tests rows win), or a unit's self-test rows: fitted "
                        "latency and bandwidth replace the link named by --link-json-for")
    g.add_argument("--link-json-for", choices=("nvlink", "ib"), default="nvlink")
    g.add_argument("--context", type=int, default=4096, help="positions in each request's KV cache")
    g.add_argument("--steps-per-block", type=int, default=16, help="denoise steps per block (+1 commit pass)")
    g.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    g.add_argument("--sampler", choices=("fused", "exact"), default="fused",
                   help="engine.sampler, for each canvas's workspace (fused: the default on CUDA)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    args = p.parse_args(argv)
    moe_layer.quick_defaults(args)
    if not (1 <= args.top_k <= args.experts and max(args.splits) <= args.experts and min(args.splits) >= 1
            and 1 <= args.items <= args.rows and args.cores >= 1):
        p.error("need 1 <= --top-k <= --experts, 1 <= --splits <= --experts, 1 <= --items <= --rows, --cores >= 1")
    if min(args.batches) < 1 or args.steps_per_block < 1 or args.context < 0 or not 0 < args.mfu <= 1:
        p.error("need --batches >= 1, --steps-per-block >= 1, --context >= 0 and 0 < --mfu <= 1")
    return args


def links(args) -> tuple[Link, Link, dict | None]:
    nvlink = Link("NVLink", args.nvlink_gbs * GB, args.nvlink_latency_us * 1e-6)
    ib = Link("InfiniBand", args.ib_gbs * GB, args.ib_latency_us * 1e-6)
    if args.link_json is None:
        return nvlink, ib, None
    fit = fit_link(read_link_json(args.link_json))
    if args.link_json_for == "nvlink":
        nvlink = fit.link("NVLink (measured)")
    else:
        ib = fit.link("InfiniBand (measured)")
    return nvlink, ib, asdict(fit) | {"for": args.link_json_for, "file": str(args.link_json)}


def gpus_here() -> int:
    import torch

    return torch.cuda.device_count()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    watch = common.LoadWatch()
    check = None if args.skip_cpu_check else cpu_check(args)
    load = watch.finish(own=1 + max(args.splits))
    dims = ModelDims(sampler=args.sampler)
    gpu = Gpu(args.hbm_gbs * GB, args.tflops * 1e12, args.mfu, args.gpu_gib * GIB)
    nvlink, ib, measured_link = links(args)
    profiles = h100_profiles(nvlink, ib)
    measured, lines = None, [] if check is None else cpu_lines(args, check) + common.load_lines(load) + [""]
    experts_from = "the roofline"
    if args.device != "cpu":
        import torch

        name = torch.cuda.get_device_name(torch.device(args.device))
        measured = {b: measure_expert_layer(dims, b, args.device, "bfloat16", args.iters, args.warmup)
                    for b in args.batches}
        lines += gpu_lines(dims, gpu, measured, name) + [""]
        experts_from = f"measured on {name} (one co-located layer; an expert rank takes 1/E of it)"
    table, h100 = h100_table(dims, gpu, profiles, args.batches, args.context, args.steps_per_block, measured)
    lines += h100_header(dims, gpu, profiles, args.context, args.steps_per_block, gpus_here(),
                         experts_from) + table
    print("\n".join(lines))
    if args.json:
        config = {k: getattr(args, k) for k in ("rows", "iters", "warmup", "hidden", "experts", "expert_width",
                                                "top_k", "items", "seed", "splits", "cores", "context", "device",
                                                "steps_per_block", "batches")}
        errors = {} if check is None else {n: c["prediction_error"] for n, c in check["configs"].items()}
        print(json.dumps({
            "config": config, "cpu_check": check, "prediction_error": errors,
            "target_error": TARGET_ERROR, "target_met": None if check is None else all(
                c["target_met"] for c in check["configs"].values()),
            "h100": {"gpu": asdict(gpu), "model": asdict(dims), "links": {"nvlink": asdict(nvlink),
                                                                          "ib": asdict(ib)},
                     "measured_link": measured_link, "measured_experts_s": measured, "predictions": h100},
            "load": load, "contended": load["contended"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
