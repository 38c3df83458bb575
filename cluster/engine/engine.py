"""The engine in one process: submit requests, iterate their events; a driver thread runs the iterations.

`Engine.step()` is one iteration (plan -> executor -> apply) and can be driven by hand in tests; `start()` runs it
on a background thread that sleeps when there is nothing to do. `submit` validates synchronously, so a bad
request is refused with an error naming the field (InputError) or the limit (ResourceExhausted) and never
enters the queue.
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
from dgserve.model.sampler import MAX_SEED, SamplerSettings
from dgserve.model.transformer import DiffusionGemma

from . import events as ev
from .budget import MemoryBudget, MemorySizes
from .config import EngineConfig
from .driver import Driver, Request
from .errors import Code, ResourceExhausted, Unavailable, UnitFailure
from .executor import Executor
from .metrics import EngineMetrics
from .plan import StepOutcome

log = logging.getLogger("dgserve.engine")


@dataclass(frozen=True)
class EngineRequest:
    prompt_ids: Sequence[int]
    settings: SamplerSettings
    seed: int = 0
    drafts: bool = False  # stream the argmax canvas after every step
    timeout_s: float | None = None  # from submit; None: the engine's default_timeout_s
    request_id: str | None = None  # made if absent


class Engine:
    def __init__(self, model: DiffusionGemma, config: EngineConfig | None = None, tokenizer=None,
                 prefetch_noise: bool = True, clock=time.monotonic, *, executor=None, ranks: int = 1,
                 watchdog_s: float | None = None, on_step=None):
        """`executor` (default: this process's Executor) runs the plans; a group executor spreads them over
        `ranks` attention ranks, each with its own memory budget. `watchdog_s`: an iteration that runs longer
        fails every request with UNAVAILABLE and marks the engine unhealthy. `on_step(engine, outcome, step_s)`
        is called after every iteration (metrics)."""
        self.model, self.config, self.clock = model, config or EngineConfig(), clock
        if model.device.type == "cpu" and torch.get_num_threads() != self.config.cpu_threads:
            log.info("engine: torch intra-op threads %d -> %d (cpu_threads)", torch.get_num_threads(),
                     self.config.cpu_threads)
            torch.set_num_threads(self.config.cpu_threads)
        page = self.config.page_size or model.config.canvas_length
        self.sizes = MemorySizes(model.config, model.dtype, page)
        self.budgets = [MemoryBudget(self.config.memory_budget_bytes) for _ in range(ranks)]
        self.budget = self.budgets[0]  # rank 0's (the only one in a single-process engine)
        self.executor = executor or Executor(model, page, prefetch_noise, self._sampler_threads(model))
        self.driver = Driver(model.config, self.config, self.sizes, self.budgets, tokenizer, clock)
        self.metrics = EngineMetrics(budget_bytes=self.config.memory_budget_bytes * ranks)
        self.watchdog_s, self.on_step = watchdog_s, on_step
        self.failure: str | None = None  # set when the engine is broken (a rank failed, the watchdog fired)
        self._iteration_started: float | None = None
        self._state = threading.Lock()  # applying an outcome vs. breaking the engine
        self._wake = threading.Condition()
        self._inbox: list[Request] = []
        self._cancels: set[ev.RequestStream] = set()
        self._streams: dict[str, ev.RequestStream] = {}
        self._rids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stopped = False

    # -- public API ------------------------------------------------------------------------------------------
    def submit(self, req: EngineRequest) -> ev.RequestStream:
        r = self._validate(req)
        with self._wake:
            if self.failure is not None:
                raise Unavailable(f"the engine unit failed ({self.failure}); send the request again")
            if self._stopped or self._stopping:
                raise Unavailable("the engine is stopping; send the request again to another replica")
            old = self._streams.get(r.request_id)
            if old is not None and not old.done and old not in self._cancels:
                raise InputError("request_id", f"{r.request_id!r} is already in use by an active request")
            queued = len(self._inbox) + len(self.driver.waiting)
            if queued >= self.config.max_queued:
                self.metrics.rejections["queue_full"] += 1
                raise ResourceExhausted(f"queue full: {queued} requests are waiting (max_queued="
                                        f"{self.config.max_queued}); retry later")
            self._inbox.append(r)
            self._streams[r.request_id] = r.stream
            self._wake.notify_all()
        return r.stream

    def check(self, req: EngineRequest) -> None:
        """Validate a request as submit would (fields, context, budget), without queueing it."""
        self._validate(req)

    def cancel(self, request_id: str) -> bool:
        """Cancel an active request; it ends with CANCELLED at the next iteration. False if not active."""
        with self._wake:
            stream = self._streams.get(request_id)
            if stream is None or stream.done:
                return False
            self._cancels.add(stream)  # by stream: a later request may reuse the id
            self._wake.notify_all()
            return True

    @property
    def healthy(self) -> bool:
        """False once the engine broke, or its driver thread died."""
        started = self._thread is not None and not self._stopping
        return self.failure is None and (not started or self._thread.is_alive())

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dgserve-driver", daemon=True)
            self._thread.start()
            if self.watchdog_s:
                threading.Thread(target=self._watchdog, name="dgserve-watchdog", daemon=True).start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop; every request still active ends with UNAVAILABLE (retriable)."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # an iteration is still running: do not touch its executor or group
                self._break(f"the engine did not stop within {timeout:g}s")
                with self._wake:
                    self._stopped = True
                return
        with self._wake:
            self._stopped = True
            self._drain_inbox()
        if hasattr(self.executor, "stop") and self.failure is None:
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
            return not self._inbox and not self._cancels and self.driver.active == 0

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
                r = next((q for q in self.driver.by_rid.values() if q.stream is stream), None)
                if r is not None:
                    r.cancelled = True
            self._cancels.clear()
        plan = self.driver.plan()
        if plan.empty:
            self._forget_done()
            return None
        self._iteration_started = time.monotonic()
        try:
            outcome = self.executor.run(plan)
        except UnitFailure as e:
            self._break(str(e))
            return None
        except Exception as e:  # a bug or an allocation failure: fail what ran, keep serving the rest
            log.exception("iteration %d failed", plan.iteration)
            self._fail_plan(plan, e)
            return None
        finally:
            self._iteration_started = None
        with self._state:
            if self.failure is not None:
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
    def _sampler_threads(self, model: DiffusionGemma) -> int:
        if self.config.sampler_threads is not None:
            return self.config.sampler_threads
        return min(8, os.cpu_count() or 1) if model.device.type == "cpu" else 1

    def _validate(self, req: EngineRequest) -> Request:
        if not isinstance(req.settings, SamplerSettings):
            raise InputError("settings", f"expected SamplerSettings, got {type(req.settings).__name__}")
        if not isinstance(req.seed, int) or isinstance(req.seed, bool) or not 0 <= req.seed <= MAX_SEED:
            raise InputError("seed", f"{req.seed!r} is not an integer in 0..{MAX_SEED}")
        timeout = req.timeout_s if req.timeout_s is not None else self.config.default_timeout_s
        if timeout is not None and (not isinstance(timeout, int | float) or isinstance(timeout, bool)
                                    or not timeout > 0):
            raise InputError("timeout_s", f"{timeout!r} is not a number of seconds > 0")
        request_id = req.request_id if req.request_id is not None else uuid.uuid4().hex
        if not isinstance(request_id, str) or not 0 < len(request_id) <= 128:
            raise InputError("request_id", "must be a string of 1..128 characters")
        prompt = validate_prompt(req.prompt_ids, self.model.config, req.settings.max_new_tokens)
        need = self.driver.max_bytes(prompt.numel(), req.settings)
        if need > self.config.memory_budget_bytes:
            self.metrics.rejections["over_budget"] += 1
            raise ResourceExhausted(
                f"the request can never fit: {prompt.numel()} prompt tokens + {req.settings.max_new_tokens} new "
                f"tokens need {need} bytes of KV cache and canvas workspace, more than the engine's memory "
                f"budget (memory_budget_bytes={self.config.memory_budget_bytes})")
        now = self.clock()
        blocks = num_blocks(req.settings.max_new_tokens, self.model.config.canvas_length)
        return Request(next(self._rids), request_id, tuple(prompt.tolist()), req.settings, req.seed, req.drafts,
                       blocks, ev.RequestStream(request_id), now, None if timeout is None else now + timeout)

    def _drain_inbox(self) -> None:
        for r in self._inbox:
            self.driver.enqueue(r)
        self._inbox.clear()

    def _forget_done(self) -> None:
        with self._wake:
            for request_id in [k for k, s in self._streams.items() if s.done]:
                event = self._streams.pop(request_id)._events
                last = event[-1] if event else None
                if isinstance(last, ev.Failed):
                    self.metrics.errors[last.code.value] += 1

    def _fail_plan(self, plan, error: Exception) -> None:
        """Fail the plan's requests with INTERNAL; their executor state is released by the next plan."""
        rids = {a.rid for a in plan.admit} | {it.rid for it in plan.items}
        for rid in rids:
            r = self.driver.by_rid.get(rid)
            if r is not None:
                r.in_executor = True
                self.driver._end(r, ev.Failed(Code.INTERNAL, f"internal error in the engine: {error}"))
        self._forget_done()

    def _record(self, out: StepOutcome, step_s: float) -> None:
        m = self.metrics
        m.record(out, step_s)
        m.budget_used_bytes = sum(b.used for b in self.budgets)
        m.queue_depth = len(self.driver.waiting)
        m.running, m.paused = len(self.driver.running), len(self.driver.paused)
        m.preemptions = sum(r.preemptions for r in self.driver.by_rid.values())

    def _break(self, reason: str) -> None:
        """The unit cannot go on: fail everything in flight as retriable, refuse new work, report unhealthy."""
        with self._state:
            if self.failure is not None:
                return
            self.failure = reason
            log.error("engine unit failed: %s", reason)
            with self._wake:
                self._drain_inbox()
                self._wake.notify_all()
            self.driver.fail_all(Code.UNAVAILABLE, f"the engine unit failed ({reason}); send the request again")
        self._forget_done()

    def _watchdog(self) -> None:
        period = min(1.0, self.watchdog_s / 4)
        while not self._stopped and self.failure is None:
            started = self._iteration_started
            if started is not None and time.monotonic() - started > self.watchdog_s:
                self._break(f"an iteration ran past the {self.watchdog_s:g}s watchdog (a rank is dead or hung)")
                return
            time.sleep(period)

    IDLE_TICK_S = 5.0  # an idle engine with a group executor sends a heartbeat this often

    def _heartbeat(self) -> None:
        beat = getattr(self.executor, "heartbeat", None)
        if beat is None:
            return
        self._iteration_started = time.monotonic()
        try:
            beat(self.driver.iteration)
        except UnitFailure as e:
            self._break(str(e))
        finally:
            self._iteration_started = None

    def _loop(self) -> None:
        try:
            self._run_loop()
        except Exception as e:  # a bug in planning or applying: fail everything visibly, never hang
            log.exception("the driver loop crashed")
            self._break(f"the driver loop crashed: {type(e).__name__}: {e}")

    def _run_loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._inbox and not self._cancels and self.driver.active == 0:
                    if not self._wake.wait(self.IDLE_TICK_S):
                        break
                if self._stopping or self.failure is not None:
                    return
                idle = not self._inbox and not self._cancels and self.driver.active == 0
            if idle:
                self._heartbeat()
                continue
            if self.step() is None and not self.idle:
                # Nothing could run (every request waits for the budget): wait for a change, not a busy loop.
                with self._wake:
                    self._wake.wait(0.01)
