"""Signs of life for the watchdog: work done, counted where it is done, never wall time.

A rank's compute thread beats its `Progress` after every layer of a pass, every canvas it samples and every
request it admits. The watchdog (failures.py) declares a unit dead only when no rank's count moved for
`watchdog_s` while an iteration was in flight: a long iteration that keeps moving is slow, not dead. Follower
ranks publish their count through the unit's rendezvous store (`StoreBoard`), where rank 0 reads it; a
SIGSTOPped or hung rank publishes nothing new, and a dead one nothing at all.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("dgserve.engine")


class Progress:
    """A count of work done; beaten by the compute threads, read by watchdogs (only a change matters)."""

    def __init__(self) -> None:
        self.count = 0

    def beat(self, *_: object) -> None:
        self.count += 1


def key(rank: int) -> str:
    return f"dgserve/progress/{rank}"


class StoreBoard:
    """Every follower's published count, as rank 0 reads it from the store (a torch.distributed Store)."""

    def __init__(self, store, world: int):
        self.store, self.world = store, world
        for rank in range(1, world):
            store.add(key(rank), 0)  # exists from now on: reading it never blocks

    def total(self) -> int:
        """The sum of the followers' counts (0 for a store that cannot be read: that is no progress)."""
        try:
            return sum(self.store.add(key(rank), 0) for rank in range(1, self.world))
        except Exception as e:  # the store lives on rank 0 itself, so this is rare; it must not kill the watchdog
            log.warning("reading the ranks' progress failed: %s", e)
            return 0


def publish(store, rank: int, read: Callable[[], int], period_s: float, *until: threading.Event) -> threading.Thread:
    """A follower's publisher thread: every `period_s`, adds what its count moved since the last time; it ends
    once any of the `until` events is set."""

    def run() -> None:
        last = 0
        while not until[0].wait(period_s) and not any(e.is_set() for e in until):
            now = read()
            if now != last:
                try:
                    store.add(key(rank), now - last)
                except Exception as e:
                    log.error("rank %d: publishing progress failed (%s); the watchdog will see it as hung", rank, e)
                    return
                last = now

    t = threading.Thread(target=run, name=f"dgserve-progress{rank}", daemon=True)
    t.start()
    return t
