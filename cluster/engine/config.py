"""Engine limits: typed, validated; every error names the field, the value and the allowed range."""

from __future__ import annotations

from dataclasses import dataclass, fields

from dgserve.model.errors import ConfigError
from dgserve.model.validate import is_int, is_number, require

GiB = 1 << 30


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 16  # requests denoising at once (one canvas each): the batch of a denoise step
    max_queued: int = 64  # requests waiting for a canvas; beyond it a submit is refused (RESOURCE_EXHAUSTED)
    prefill_chunk: int = 512  # prompt tokens per prefill work item
    max_prefill_tokens: int = 2048  # encode rows per iteration for prompt chunks and replays (oldest first)
    # KV cache + per-canvas sampler workspace of all admitted requests (per attention rank). None: derived when
    # the engine starts, after the weights are loaded: memory_fraction of the device's memory less what is already
    # in use and a reserve (cluster/engine/fit.py); on CPU, where the host's memory is everyone's, 4 GiB.
    memory_budget_bytes: int | None = None
    memory_fraction: float = 0.9
    page_size: int | None = None  # KV page (positions) on full-attention layers; default: the canvas length
    default_timeout_s: float | None = None  # deadline for requests that set none; None: no deadline
    # torch intra-op threads on CPU. 1 keeps GEMM row blocking fixed (batching stays bitwise invisible at the
    # lowest cost) and leaves the other cores to the sampler's worker threads.
    cpu_threads: int = 1
    # Threads for the per-canvas work after the layers (LM head, sampling, self-conditioning), used when several
    # canvases step together. None: the machine's cores (at most 8) on CPU, 1 on GPU.
    sampler_threads: int | None = None
    # Draw each canvas's sampler noise on a worker thread while its forward runs (CPU only; the same draws in the
    # same order either way). One thread more than cpu_threads + the sampler pool.
    noise_prefetch: bool = True
    # With expert ranks: "variable" exchanges each layer's row counts first and sends exactly the rows (bitwise
    # batch-invariant on CPU); "fixed" sends padded equal splits sized from the pass's row bound (a power-of-two
    # number of canvases), with no count read back inside the pass, as CUDA graphs need, at the padding's cost.
    expert_exchange: str = "variable"
    # The sampler after the layers. "exact": logits [C, V], probabilities and (on CPU) the reference's exponential
    # noise per canvas: token-exact with the reference, at about C x V x 4 bytes a canvas (268 MB on the real
    # model). "fused": the fused vocabulary pass (kernels/vocab): entropy, argmax, a counter-based Gumbel-max
    # draw and the self-conditioning input in one pass, no [C, V] tensor (about 15 MB a canvas); the same
    # distribution, other draws. "auto": fused on CUDA, exact on CPU.
    sampler: str = "auto"
    # On CUDA with every expert in this process: the decoder step of up to max_running canvases (1, 2, 4, ... 32)
    # as CUDA graphs captured when the engine starts (model/step_graphs.py); attention runs between them.
    cuda_graphs: bool = True
    # Reuse the KV of prompt prefixes already encoded on the same attention rank by the same tenant (driver.py,
    # prefix.py): entries live in the memory budget and give way to requests.
    prefix_cache: bool = True

    def __post_init__(self) -> None:
        def need(name: str, ok: bool, allowed: str) -> None:
            require(ok, name, getattr(self, name), allowed, "engine")

        need("max_running", is_int(self.max_running) and 1 <= self.max_running <= 4096, "an integer in 1..4096")
        need("max_queued", is_int(self.max_queued) and 0 <= self.max_queued <= 1_000_000,
             "an integer in 0..1000000")
        need("prefill_chunk", is_int(self.prefill_chunk) and 1 <= self.prefill_chunk <= 1 << 20,
             "an integer in 1..1048576")
        need("max_prefill_tokens", is_int(self.max_prefill_tokens) and self.max_prefill_tokens >= self.prefill_chunk,
             f"an integer >= prefill_chunk ({self.prefill_chunk})")
        budget = self.memory_budget_bytes
        need("memory_budget_bytes", budget is None or (is_int(budget) and budget > 0),
             "null or an integer number of bytes > 0")
        need("memory_fraction", is_number(self.memory_fraction) and 0 < self.memory_fraction <= 1,
             "a number in (0, 1]")
        need("page_size", self.page_size is None or (is_int(self.page_size) and 1 <= self.page_size <= 1 << 16),
             "null or an integer in 1..65536")
        need("default_timeout_s", self.default_timeout_s is None or (
            is_number(self.default_timeout_s) and self.default_timeout_s > 0), "null or a number of seconds > 0")

        need("cpu_threads", is_int(self.cpu_threads) and 1 <= self.cpu_threads <= 1024, "an integer in 1..1024")
        need("sampler_threads", self.sampler_threads is None or (
            is_int(self.sampler_threads) and 1 <= self.sampler_threads <= 64), "null or an integer in 1..64")
        need("noise_prefetch", isinstance(self.noise_prefetch, bool), "true | false")
        need("expert_exchange", self.expert_exchange in ("variable", "fixed"), "variable | fixed")
        need("sampler", self.sampler in ("auto", "exact", "fused"), "auto | exact | fused")
        need("cuda_graphs", isinstance(self.cuda_graphs, bool), "true | false")
        need("prefix_cache", isinstance(self.prefix_cache, bool), "true | false")

    def max_step_rows(self, canvas_length: int) -> int:
        """The most token rows one iteration runs on one attention rank: a denoise canvas and a fresh commit per
        running request, plus the encode budget (prompt chunks and replays; one replayed commit may exceed a budget
        smaller than a canvas). An iteration's time is bounded by this, whatever the requests ask."""
        return 2 * self.max_running * canvas_length + max(self.max_prefill_tokens, canvas_length)

    def fixed_canvas(self, canvas_length: int) -> int:
        """The canvas length a fixed-capacity exchange rounds its row bound to; 0 with the variable exchange."""
        return canvas_length if self.expert_exchange == "fixed" else 0

    def fused_sampler(self, device_type: str) -> bool:
        """Whether canvases on `device_type` use the fused vocabulary pass."""
        return self.sampler == "fused" or (self.sampler == "auto" and device_type == "cuda")

    def sampler_threads_for(self, device_type: str, cpus: int | None) -> int:
        """The sampler threads to run with: the configured number, or by default the CPUs given (at most 8) on
        CPU and 1 on GPU."""
        if self.sampler_threads is not None:
            return self.sampler_threads
        return max(1, min(8, cpus or 1)) if device_type == "cpu" else 1

    @classmethod
    def from_dict(cls, raw: dict) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        for key in raw:
            if key not in known:
                raise ConfigError(key, raw[key], f"one of {sorted(known)}", "engine")
        return cls(**raw)
