"""The driver thread: iterate while there is work, sleep when there is none, send heartbeats while idle.

1. While any request is queued, running, paused or being cancelled, run iterations back to back.
2. When an iteration could run nothing (every request waits for memory), wait 10 ms for a change, not a busy loop.
3. When idle, sleep until a submit, a cancel or a stop wakes the loop; after IDLE_TICK_S without work, heartbeat.
4. End when asked to stop or when the unit failed. A crash of the loop itself is reported (the failure policy
   fails the unit), so a request never waits on a dead thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("dgserve.engine")


class DriverLoop:
    IDLE_TICK_S = 5.0
    BLOCKED_WAIT_S = 0.01

    def __init__(self, wake: threading.Condition, has_work: Callable[[], bool], step: Callable[[], object | None],
                 heartbeat: Callable[[], None], should_end: Callable[[], bool], on_crash: Callable[[str], None]):
        """`has_work` is called holding `wake`; `step()` returns None when it ran nothing."""
        self.wake, self.has_work, self.step, self.heartbeat = wake, has_work, step, heartbeat
        self.should_end, self.on_crash = should_end, on_crash
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="dgserve-driver", daemon=True)
            self._thread.start()

    def join(self, timeout: float) -> bool:
        """True when the thread ended (or never started) within `timeout` seconds."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.alive

    def _main(self) -> None:
        try:
            self._run()
        except Exception as e:
            log.exception("the driver loop crashed")
            self.on_crash(f"the driver loop crashed: {type(e).__name__}: {e}")

    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.should_end() and not self.has_work():
                    if not self.wake.wait(self.IDLE_TICK_S):
                        break
                if self.should_end():
                    return
                busy = self.has_work()
            if not busy:
                self.heartbeat()
            elif self.step() is None:
                with self.wake:
                    if self.has_work():
                        self.wake.wait(self.BLOCKED_WAIT_S)
