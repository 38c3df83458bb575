"""Per-request event streams: drafts (if asked), committed blocks, then final statistics or an error.

The driver thread pushes token events; consumers iterate, either blocking (`for event in stream`) or from asyncio
(`async for event in stream`). A stream's `output` step (detokenization, cluster/engine/output.py) runs on the
consumer's side as events are taken out, never on the driver thread. A stream always ends with exactly one
`Finished` or `Failed` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import Code


@dataclass(frozen=True, slots=True)
class Draft:
    """The argmax canvas after a denoise step (only when the request asked for drafts)."""

    block: int
    step: int
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class BlockCommitted:
    block: int
    token_ids: tuple[int, ...]  # padded after EOS, as the reference returns them
    steps: int
    text: str | None = None  # filled on the way out when the engine has a tokenizer


@dataclass(frozen=True, slots=True)
class Stats:
    blocks: int
    steps_per_block: tuple[int, ...]
    tokens_per_forward: float  # non-pad generated tokens per decoder pass
    time_to_first_block_s: float | None
    total_s: float
    queue_s: float  # from submit to admission
    preemptions: int = 0
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache at admission (not encoded)


@dataclass(frozen=True, slots=True)
class Finished:
    token_ids: tuple[int, ...]
    finish_reason: str  # "eos" | "length"
    stats: Stats
    text: str | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    code: Code
    message: str

    @property
    def retriable(self) -> bool:
        return self.code in (Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED)


Event = Draft | BlockCommitted | Finished | Failed


@dataclass(eq=False)
class RequestStream:
    """The events of one request. Thread-safe producer side; sync or async consumer side."""

    request_id: str  # a label for messages; the stream object itself is its request's handle (Engine.cancel)
    output: Callable[[Event], Event] | None = None  # applied to each event as a consumer takes it
    _events: deque = field(default_factory=deque)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _closed: bool = False
    _waiters: list = field(default_factory=list)  # (loop, asyncio.Event) of async consumers
    final: Finished | Failed | None = None  # the terminal event, once pushed

    def push(self, event: Event) -> None:
        with self._cond:
            if self._closed:
                return
            self._events.append(event)
            if isinstance(event, Finished | Failed):
                self._closed, self.final = True, event
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, ev in waiters:
            with contextlib.suppress(RuntimeError):  # that consumer's loop is closed: nobody waits there any more
                loop.call_soon_threadsafe(ev.set)

    @property
    def done(self) -> bool:
        return self._closed

    def _pop(self) -> Event | None:
        return self._out(self._events.popleft()) if self._events else None

    def _out(self, event: Event) -> Event:
        return event if self.output is None else self.output(event)

    def __iter__(self):
        while True:
            with self._cond:
                while not self._events:
                    self._cond.wait()
                event = self._pop()
            yield event
            if isinstance(event, Finished | Failed):
                return

    def get(self, timeout: float | None = None) -> Event:
        """The next event, waiting up to `timeout` seconds (TimeoutError after)."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._events), timeout):
                raise TimeoutError(f"request {self.request_id}: no event within {timeout}s")
            return self._pop()

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                event = self._pop()
                if event is None:
                    ready = asyncio.Event()
                    self._waiters.append((loop, ready))
            if event is None:
                try:
                    await ready.wait()
                except BaseException:
                    with self._cond:
                        if (loop, ready) in self._waiters:
                            self._waiters.remove((loop, ready))
                    raise
                continue
            yield event
            if isinstance(event, Finished | Failed):
                return

    def result(self, timeout: float | None = None) -> Finished:
        """Wait for the end (events stay queued for iteration): the Finished event, or the error raised."""
        from .errors import EngineError

        with self._cond:
            if not self._cond.wait_for(lambda: self._closed, timeout):
                raise TimeoutError(f"request {self.request_id}: not finished within {timeout}s")
        if isinstance(self.final, Failed):
            raise EngineError(f"request {self.request_id}: {self.final.message}", self.final.code)
        return self._out(self.final)
