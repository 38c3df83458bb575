"""The gateway's text worker: tokenization runs on its own thread (the event loop keeps answering), a bounded
number of texts wait, and a text whose caller left is never tokenized."""

from __future__ import annotations

import asyncio
import threading

import pytest

from dgserve.cluster.engine.errors import ResourceExhausted
from dgserve.cluster.gateway.text import TextWorker


def test_work_runs_off_the_event_loop_which_keeps_answering():
    async def main():
        worker, release = TextWorker(), threading.Event()
        job = asyncio.ensure_future(worker.run(lambda: (release.wait(10), threading.current_thread().name)[1]))
        ticks = 0
        while ticks < 20:  # the loop turns while the job blocks its thread
            await asyncio.sleep(0.001)
            ticks += 1
        assert not job.done()
        release.set()
        name = await job
        worker.close()
        return name, threading.current_thread().name

    worker_thread, loop_thread = asyncio.run(main())
    assert worker_thread.startswith("dgserve-tokenize") and worker_thread != loop_thread


def test_beyond_max_pending_a_text_is_refused_at_once_and_a_departed_callers_text_never_runs():
    async def main():
        worker, release, ran = TextWorker(max_pending=2), threading.Event(), []
        first = asyncio.ensure_future(worker.run(lambda: (release.wait(10), ran.append("first"))))
        second = asyncio.ensure_future(worker.run(lambda: ran.append("second")))
        await asyncio.sleep(0.05)
        with pytest.raises(ResourceExhausted, match="at most 2"):
            await worker.run(lambda: ran.append("third"))
        second.cancel()  # its caller went away before the worker reached it
        await asyncio.sleep(0.05)
        release.set()
        await first
        await asyncio.sleep(0.05)
        worker.close()
        assert worker.pending == 0
        return ran

    assert asyncio.run(main()) == ["first"]
