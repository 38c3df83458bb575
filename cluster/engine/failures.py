"""The failure policy: what fails one request, what fails the whole unit, and how a hang is noticed.

The failure classes, and what each one fails:

1. A request's own bad state (its plan items do not match its state, its sampling step raises): that request
   ends with INTERNAL; every other request of the iteration goes on (executor.py isolates it per request).
2. An allocation that fails for one request (its cache, its canvas, its sampler workspace): that request ends
   with RESOURCE_EXHAUSTED (retriable); the others go on.
3. A failure of the packed pass itself (out of memory for the whole batch, or one request's rows that make it
   raise): every cache is rolled back and the pass is split by request until the culprit runs alone; the
   other requests run with exactly their rows and RNG state, so their tokens do not change. Only the culprit
   fails (RESOURCE_EXHAUSTED for memory, INTERNAL otherwise).
4. A rank that dies or hangs, a broken collective (UnitFailure), no progress on any rank for `watchdog_s`
   while an iteration is in flight, or a crash of the driver loop: the unit fails. Every request in flight
   ends with UNAVAILABLE (retriable), new requests are refused, and the engine reports itself unhealthy so
   that Serve rebuilds it. A unit that failed stays failed; it is replaced, never repaired.
5. Anything else an executor raises (a bug outside the per-request isolation) fails the requests of that plan
   with INTERNAL; the engine keeps serving.

The watchdog watches progress, not wall time (progress.py): every rank counts the layers it ran and the
canvases it sampled, and the unit is declared dead only when no count moved for `watchdog_s` during an
iteration. A long iteration that keeps moving is never failed; one iteration's work is bounded anyway (at most
`max_running` canvases and commits per attention rank, and `max_prefill_tokens` prompt tokens). Once the unit
failed, an iteration that was still running when it failed never applies its outcome.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

from .driver import Driver
from .errors import Code, UnitFailure
from .executor import StepExecutor
from .plan import StepOutcome, StepPlan

log = logging.getLogger("dgserve.engine")


class FailurePolicy:
    def __init__(self, watchdog_s: float | None, fail_unit: Callable[[str], None],
                 progress: Callable[[], int] = lambda: 0):
        """`fail_unit(reason)` ends every request in flight; it is called once, under `lock`. `progress()` is the
        executor's count of work done on all ranks (any change is a sign of life)."""
        self.watchdog_s = watchdog_s
        self.failure: str | None = None
        self.lock = threading.Lock()  # failing the unit vs. applying an outcome
        self._fail_unit = fail_unit
        self._progress = progress
        self._started: float | None = None  # monotonic start of the iteration in progress

    def run(self, executor: StepExecutor, plan: StepPlan, driver: Driver) -> StepOutcome | None:
        """Run a plan under the watchdog; None when it failed (its requests, or the unit)."""
        with self._timed():
            try:
                return executor.run(plan)
            except UnitFailure as e:
                self.unit_failed(str(e))
            except Exception as e:
                log.exception("iteration %d failed", plan.iteration)
                with self.lock:
                    driver.fail_plan(plan, Code.INTERNAL, f"internal error in the engine: {e}")
        return None

    def heartbeat(self, executor: StepExecutor, iteration: int) -> None:
        """An empty iteration through every rank while idle: a rank that died while idle is found now."""
        with self._timed():
            try:
                executor.heartbeat(iteration)
            except UnitFailure as e:
                self.unit_failed(str(e))

    def unit_failed(self, reason: str) -> None:
        with self.lock:
            if self.failure is not None:
                return
            self.failure = reason
            log.error("engine unit failed: %s", reason)
            self._fail_unit(reason)

    def watch(self, done: Callable[[], bool]) -> None:
        """Start the watchdog thread (when a limit is set); it ends when `done()` or the unit failed."""
        if self.watchdog_s:
            threading.Thread(target=self._watch, args=(done,), name="dgserve-watchdog", daemon=True).start()

    def _watch(self, done: Callable[[], bool]) -> None:
        period = min(1.0, self.watchdog_s / 4)
        seen, moved = self._progress(), time.monotonic()
        while not done() and self.failure is None:
            started = self._started
            count, now = self._progress(), time.monotonic()
            if count != seen:
                seen, moved = count, now
            if started is not None and now - max(started, moved) > self.watchdog_s:
                self.unit_failed(f"no rank made progress for {self.watchdog_s:g}s (the watchdog: a rank is dead or "
                                 f"hung) in an iteration running for {now - started:.1f}s")
                return
            time.sleep(period)

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        self._started = time.monotonic()
        try:
            yield
        finally:
            self._started = None
