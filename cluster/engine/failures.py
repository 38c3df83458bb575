"""The failure policy: what fails one request, what fails the whole unit, and how a hang is noticed.

1. An error while running a plan that is not a UnitFailure (a bug, a failed allocation) fails only the requests
   that plan touched, with INTERNAL; the engine keeps serving the others.
2. A UnitFailure (a rank died, a collective broke), an iteration or heartbeat that runs past `watchdog_s`, or a
   crash of the driver loop fails the unit: every request in flight ends with UNAVAILABLE (retriable), new
   requests are refused, and the engine reports itself unhealthy so that Serve rebuilds it. A unit that failed
   stays failed; it is replaced, never repaired.
3. The watchdog times each iteration from its start; slow is not failed until the limit passes.
4. Once the unit failed, an iteration that was still running when it failed never applies its outcome.
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
    def __init__(self, watchdog_s: float | None, fail_unit: Callable[[str], None]):
        """`fail_unit(reason)` ends every request in flight; it is called once, under `lock`."""
        self.watchdog_s = watchdog_s
        self.failure: str | None = None
        self.lock = threading.Lock()  # failing the unit vs. applying an outcome
        self._fail_unit = fail_unit
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
        while not done() and self.failure is None:
            started = self._started
            if started is not None and time.monotonic() - started > self.watchdog_s:
                self.unit_failed(f"an iteration ran past the {self.watchdog_s:g}s watchdog (a rank is dead or hung)")
                return
            time.sleep(period)

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        self._started = time.monotonic()
        try:
            yield
        finally:
            self._started = None
