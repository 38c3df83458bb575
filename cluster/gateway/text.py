"""Tokenization and chat-template rendering off the gateway's event loop.

The event loop serves every RPC, health included; a long text would stall them all while it is tokenized
(10 MB took 12-20 s). Text is first refused above `gateway.max_text_bytes` (convert.check_text), and what is
left runs here:
1. One worker thread: a Hugging Face tokenizer may not be called from two threads at once (its Rust object is
   borrowed mutably to set truncation and padding), and encoding releases the GIL, so the loop keeps running.
2. At most `max_pending` texts wait; beyond that a call gets RESOURCE_EXHAUSTED (retry later) at once.
3. A job whose caller went away before it started is dropped (its future is cancelled), never run.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from ..engine.errors import ResourceExhausted


class TextWorker:
    def __init__(self, max_pending: int = 64):
        self.max_pending = max_pending
        self.pending = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dgserve-tokenize")

    async def run(self, fn, *args):
        if self.pending >= self.max_pending:
            raise ResourceExhausted(f"the tokenizer is busy: {self.pending} texts are waiting "
                                    f"(at most {self.max_pending}); retry later")
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self.pending -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
