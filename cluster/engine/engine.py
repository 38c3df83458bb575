"""The engine's public API in one process: submit requests, iterate their events, cancel, stop.

`Engine.step()` is one iteration (plan -> executor -> apply) and can be driven by hand in tests; `start()` runs it
on the driver thread (loop.py). `submit` validates synchronously, so a bad request is refused with an error
naming the field (InputError) or the limit (ResourceExhausted) and never enters the queue. The parts live apart:
the scheduling policy in driver.py, the tensors in the executor (a StepExecutor), what fails what in failures.py,
counters in metrics.py, and detokenization on the way out in output.py.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dgserve.model.config import num_blocks
from dgserve.model.errors import InputError
from dgserve.model.generate import validate_prompt
from dgserve.model.layers import activation_rows_invariant
from dgserve.model.media import MediaItem, media_spans
from dgserve.model.sampler import MAX_SEED, SamplerSettings
from dgserve.model.transformer import DiffusionGemma
from dgserve.model.validate import is_int, is_number
from dgserve.model.vision import as_patches, check_patches

from . import events as ev
from .budget import MemoryBudget, MemorySizes
from .config import EngineConfig
from .driver import Driver, Request
from .errors import Code, ResourceExhausted, TooLarge, Unavailable
from .executor import Executor, StepExecutor
from .failures import FailurePolicy
from .fit import resolve_budget
from .graphs import step_graphs
from .loop import DriverLoop
from .metrics import EngineMetrics
from .output import Detokenizer
from .plan import StepOutcome

log = logging.getLogger("dgserve.engine")


@dataclass(frozen=True)
class EngineRequest:
    prompt_ids: Sequence[int]
    settings: SamplerSettings
    seed: int = 0
    drafts: bool = False  # stream the argmax canvas after every step
    timeout_s: float | None = None  # from submit; None: the engine's default_timeout_s
    request_id: str | None = None  # a label (logs, events, status), made if absent; never a handle: it may repeat
    # Who sent it: cached prompt prefixes are shared only between requests of one tenant (the gateway passes a
    # digest of the caller's API key; "" when the endpoint has no keys)
    tenant: str = ""
    # Images and video frames (dgserve.model.media.MediaItem, processed by the gateway), in the order of their
    # soft-token runs in prompt_ids
    media: tuple = ()


class Engine:
    def __init__(self, model: DiffusionGemma, config: EngineConfig | None = None, tokenizer=None,
                 clock=time.monotonic, *, executor: StepExecutor | None = None, ranks: int = 1,
                 watchdog_s: float | None = None, on_step=None):
        """`executor` (default: this process's Executor) runs the plans; a group executor spreads them over
        `ranks` attention ranks, each with its own memory budget. `watchdog_s`: an iteration in which no rank made
        progress for that long fails every request with UNAVAILABLE and marks the engine unhealthy.
        `on_step(engine, outcome, step_s)` is called after every iteration (metrics). With a `tokenizer`, committed
        blocks and final events carry text."""
        self.model, self.config, self.clock, self.tokenizer = model, config or EngineConfig(), clock, tokenizer
        if model.device.type == "cpu":
            self._use_cpu_threads()
        page = self.config.page_size or model.config.canvas_length
        fused = self.config.fused_sampler(model.device.type)
        self.sizes = MemorySizes(model.config, model.dtype, page, fused, model.device)
        # captured before the budget is taken from the device's free memory, so the graphs' memory is counted
        graphs = step_graphs(model, self.config) if executor is None else None
        self.budget_bytes = resolve_budget(self.config.memory_budget_bytes, self.config.memory_fraction, model.device)
        self.budgets = [MemoryBudget(self.budget_bytes) for _ in range(ranks)]
        self.budget = self.budgets[0]  # rank 0's (the only one in a single-process engine)
        threads = self.config.sampler_threads_for(model.device.type, os.cpu_count())
        self.executor: StepExecutor = executor or Executor(model, page, self.config.noise_prefetch, threads, fused,
                                                           graphs)
        self.driver = Driver(model.config, self.config, self.sizes, self.budgets, clock)
        self.metrics = EngineMetrics(budget_bytes=self.budget_bytes * ranks)
        self.on_step = on_step
        self.failures = FailurePolicy(watchdog_s, self._fail_unit, self._progress)
        self._wake = threading.Condition()  # guards the inbox, the cancels, the streams and the stop flags
        self._inbox: list[Request] = []
        self._cancels: set[ev.RequestStream] = set()
        self._streams: set[ev.RequestStream] = set()  # not yet ended; a stream is its request's only handle
        self._rids = itertools.count()
        self._stopping = False
        self._stopped = False
        self.loop = DriverLoop(self._wake, self._has_work, self.step, self._heartbeat,
                               lambda: self._stopping or self.failures.failure is not None,
                               self.failures.unit_failed)

    @property
    def failure(self) -> str | None:
        """Why the unit failed; None while it is sound."""
        return self.failures.failure

    # -- public API ------------------------------------------------------------------------------------------
    def submit(self, req: EngineRequest) -> ev.RequestStream:
        r = self._validate(req)
        with self._wake:
            if self.failure is not None:
                raise Unavailable(f"the engine unit failed ({self.failure}); send the request again")
            if self._stopped or self._stopping:
                raise Unavailable("the engine is stopping; send the request again to another replica")
            queued = len(self._inbox) + self.driver.queued
            if queued >= self.config.max_queued:
                self.metrics.rejections["queue_full"] += 1
                raise ResourceExhausted(f"queue full: {queued} requests are waiting (max_queued="
                                        f"{self.config.max_queued}); retry later")
            self._inbox.append(r)
            self._streams.add(r.stream)
            self._wake.notify_all()
        return r.stream

    def check(self, req: EngineRequest) -> None:
        """Validate a request as submit would (fields, context, budget), without queueing it."""
        self._validate(req)

    def cancel(self, stream: ev.RequestStream) -> bool:
        """Cancel the request of `stream` (what `submit` returned); it ends with CANCELLED at the next iteration.
        False if it is not active here. By stream, never by request_id: that is a label any caller may reuse."""
        with self._wake:
            if stream not in self._streams or stream.done:
                return False
            self._cancels.add(stream)
            self._wake.notify_all()
            return True

    def placements(self) -> list[tuple[str, int]]:
        """(request_id, attention rank) of each active request, taken at one instant; an id may repeat."""
        return self.driver.placements()

    @property
    def healthy(self) -> bool:
        """False once the engine broke, or its driver thread died."""
        running = self.loop.started and not self._stopping
        return self.failure is None and (not running or self.loop.alive)

    def start(self) -> Engine:
        if not self.loop.started:
            self.loop.start()
            self.failures.watch(lambda: self._stopped)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop; every request still active ends with UNAVAILABLE (retriable)."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if not self.loop.join(timeout):  # an iteration is still running: do not touch its executor or group
            self.failures.unit_failed(f"the engine did not stop within {timeout:g}s")
            with self._wake:
                self._stopped = True
            return
        with self._wake:
            self._stopped = True
            self._drain_inbox()
        if self.failure is None:
            self.executor.stop()
        self.executor.close()
        self.driver.fail_all(Code.UNAVAILABLE, "the engine stopped before the request finished; send it again")

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def idle(self) -> bool:
        with self._wake:
            return not self._has_work()

    def run_until_idle(self, max_iterations: int = 1_000_000) -> None:
        """Drive iterations on this thread until every request has ended (tests, batch jobs)."""
        for _ in range(max_iterations):
            if self.idle:
                return
            self.step()
        raise RuntimeError(f"engine still busy after {max_iterations} iterations")

    # -- one iteration ---------------------------------------------------------------------------------------
    def step(self) -> StepOutcome | None:
        t0 = time.perf_counter()
        with self._wake:
            self._drain_inbox()
            for stream in self._cancels:
                self.driver.cancel(stream)
            self._cancels.clear()
        plan = self.driver.plan()
        outcome = None if plan.empty else self.failures.run(self.executor, plan, self.driver)
        if outcome is not None:
            with self.failures.lock:
                if self.failure is not None:  # the unit failed while this iteration ran
                    return None
                self.driver.apply(plan, outcome)
            for a in plan.admit:
                self.metrics.admitted_per_rank[a.rank] += 1
            step_s = time.perf_counter() - t0
            self._record(outcome, step_s)
            if self.on_step is not None:
                self.on_step(self, outcome, step_s)
        self._forget_done()
        return outcome

    # -- internals -------------------------------------------------------------------------------------------
    def _use_cpu_threads(self) -> None:
        threads = self.config.cpu_threads
        if torch.get_num_threads() != threads:
            log.info("engine: torch intra-op threads %d -> %d (cpu_threads)", torch.get_num_threads(), threads)
            torch.set_num_threads(threads)
        text = self.model.config.text
        if threads > 1 and self.model.exact_batching and not all(activation_rows_invariant(threads, w) for w in
                                                 (text.intermediate_size, text.moe_intermediate_size)):
            log.warning("engine: at cpu_threads=%d the activation kernels split rows by position for this model's "
                        "widths (%d, %d): batched results may differ from solo ones in the last bits; "
                        "cpu_threads=1 keeps batching bitwise", threads, text.intermediate_size,
                        text.moe_intermediate_size)

    def _validate(self, req: EngineRequest) -> Request:
        if not isinstance(req.settings, SamplerSettings):
            raise InputError("settings", f"expected SamplerSettings, got {type(req.settings).__name__}")
        if not is_int(req.seed) or not 0 <= req.seed <= MAX_SEED:
            raise InputError("seed", f"{req.seed!r} is not an integer in 0..{MAX_SEED}")
        timeout = req.timeout_s if req.timeout_s is not None else self.config.default_timeout_s
        if timeout is not None and not (is_number(timeout) and timeout > 0):
            raise InputError("timeout_s", f"{timeout!r} is not a number of seconds > 0")
        request_id = req.request_id if req.request_id is not None else uuid.uuid4().hex
        if not isinstance(request_id, str) or not 0 < len(request_id) <= 128:
            raise InputError("request_id", "must be a string of 1..128 characters")
        if not isinstance(req.tenant, str) or len(req.tenant) > 128:
            raise InputError("tenant", "must be a string of at most 128 characters")
        media = self._check_media(req.media)
        prompt = validate_prompt(req.prompt_ids, self.model.config, req.settings.max_new_tokens, media=media)
        need = self.driver.max_bytes(prompt.numel(), req.settings, sum(m.soft_tokens for m in media))
        if need > self.budget_bytes:
            self.metrics.rejections["over_budget"] += 1
            raise TooLarge(
                f"the request can never fit: {prompt.numel()} prompt tokens + {req.settings.max_new_tokens} new "
                f"tokens need {need} bytes of KV cache and canvas workspace, more than the engine's memory "
                f"budget (memory_budget_bytes={self.budget_bytes})")
        now = self.clock()
        blocks = num_blocks(req.settings.max_new_tokens, self.model.config.canvas_length)
        output = None if self.tokenizer is None else Detokenizer(self.tokenizer, req.settings.pad_token_id)
        spans = tuple(media_spans(prompt.tolist(), self.model.config.media_token_ids)) if media else ()
        return Request(next(self._rids), request_id, tuple(prompt.tolist()), req.settings, req.seed, req.drafts,
                       blocks, ev.RequestStream(request_id, output), now, None if timeout is None else now + timeout,
                       tenant=req.tenant, media=media, spans=spans)

    def _check_media(self, media) -> tuple:
        if not isinstance(media, tuple | list) or not all(isinstance(m, MediaItem) for m in media):
            raise InputError("media", "expected a sequence of processed images (dgserve.model.media.MediaItem)")
        vc = self.model.config.vision
        if media and vc is None:
            raise InputError("media", "this checkpoint has no vision tower: it reads text only")
        for i, m in enumerate(media):
            check_patches(vc, as_patches(m), f"media[{i}]")
        return tuple(media)

    def _has_work(self) -> bool:
        """Called holding `_wake`."""
        return bool(self._inbox or self._cancels or self.driver.active)

    def _drain_inbox(self) -> None:
        for r in self._inbox:
            self.driver.enqueue(r)
        self._inbox.clear()

    def _forget_done(self) -> None:
        with self._wake:
            for stream in [s for s in self._streams if s.done]:
                self._streams.remove(stream)
                if isinstance(stream.final, ev.Failed):
                    self.metrics.errors[stream.final.code.value] += 1

    def _record(self, out: StepOutcome, step_s: float) -> None:
        m = self.metrics
        m.record(out, step_s)
        m.budget_used_bytes = sum(b.used for b in self.budgets)
        c = self.driver.counts()
        m.queue_depth, m.running, m.paused, m.preemptions = c.waiting, c.running, c.paused, c.preemptions
        m.prefix, m.prefix_entries, m.prefix_bytes = self.driver.prefix.stats()

    def _fail_unit(self, reason: str) -> None:
        """The failure policy's unit failure: everything in flight ends as retriable; new work is refused."""
        with self._wake:
            self._drain_inbox()
            self._wake.notify_all()
        self.driver.fail_all(Code.UNAVAILABLE, f"the engine unit failed ({reason}); send the request again")
        self._forget_done()

    def _progress(self) -> int:
        progress = getattr(self.executor, "progress", None)  # an executor without it shows no progress at all
        return progress() if progress is not None else 0

    def _heartbeat(self) -> None:
        self.failures.heartbeat(self.executor, self.driver.iteration)
