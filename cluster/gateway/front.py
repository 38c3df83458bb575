"""What every front of the endpoint shares (the gRPC gateway and the OpenAI-compatible HTTP ingress): the
checkpoint's tokenizer, config and sampler defaults, the limits, and one request's events from an engine unit."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray.serve.exceptions import BackPressureError

from dgserve.model.config import ModelConfig, load_generation_defaults, load_model_config
from dgserve.model.hub import TOKENIZER_PATTERNS, resolve_checkpoint
from dgserve.model.media import MediaProcessor
from dgserve.model.settings import SamplerSettings
from dgserve.model.tokenizer import load_tokenizer

from ..config import Topology
from ..engine.errors import Code
from ..engine.events import Event, Failed, Finished
from ..messages import GenerateRequest
from .convert import Limits, limits_for

log = logging.getLogger("dgserve.gateway")

TINY_MODEL_ID = "dgserve/tiny (embedded default, random weights)"


@dataclass
class Front:
    topo: Topology
    tokenizer: object | None
    config: ModelConfig
    defaults: SamplerSettings
    limits: Limits
    model_id: str
    media: MediaProcessor | None = None  # the checkpoint's image processor (None: a text-only checkpoint)

    @property
    def pad(self) -> int | None:
        return self.defaults.pad_token_id


def load_front(topo: Topology) -> Front:
    """The checkpoint's tokenizer and configs (only those files are fetched) and the gateway's limits."""
    if topo.model is None:
        from dgserve.model.hub import default_model_dir

        folder, model_id = default_model_dir(), TINY_MODEL_ID
    else:
        folder = resolve_checkpoint(topo.model, topo.revision, patterns=TOKENIZER_PATTERNS)
        model_id = topo.model
    config, g = load_model_config(folder), topo.gateway
    media = (MediaProcessor.from_checkpoint(folder)
             if config.vision is not None and (folder / "preprocessor_config.json").is_file() else None)
    return Front(topo, load_tokenizer(folder), config, load_generation_defaults(folder),
                 limits_for(config, g.max_prompt_tokens, g.max_text_bytes, g.max_message_bytes, g.max_media_bytes),
                 model_id, media)


def request_id(given: str | None) -> str:
    """The client's request id when it is a usable one, else a new one. It is echoed in response headers, where
    anything but printable ASCII would be refused (gRPC fails the call with INTERNAL)."""
    given = given or ""
    return given if 0 < len(given) <= 128 and given.isascii() and given.isprintable() else uuid.uuid4().hex


def overloaded(e: BackPressureError) -> Failed:
    return Failed(Code.RESOURCE_EXHAUSTED, f"overloaded: every engine unit is busy and the wait queue is full "
                                           f"({e.message}, serve.max_queued_requests); retry later")


async def unit_events(unit, req: GenerateRequest, caller, hard_stop: asyncio.Event,
                      inflight: Counter) -> AsyncIterator[Event]:
    """One request's events from an engine unit, always ending with Finished or Failed: a full queue, a unit that
    died and a server that stops become Failed events with their codes. The call is counted in `inflight` while it
    runs, and cancelled on the unit when the caller stops reading before the unit ended it."""
    rid = req.request_id
    response = unit.options(stream=True).generate.remote(req, caller)
    inflight[rid] += 1
    events = response.__aiter__()
    ended = False  # the unit ended the call itself (Finished or Failed): nothing to cancel
    try:
        while True:
            try:
                event, from_unit = await _next(events, hard_stop)
            except asyncio.CancelledError:
                raise
            except BackPressureError as e:  # every unit is full and so is this front's wait queue
                event, from_unit = overloaded(e), False
            except Exception as e:  # the unit's replica died, Serve refused or cancelled the call, ...
                log.warning("request %s: the engine unit failed: %r", rid, e)
                event, from_unit = Failed(Code.UNAVAILABLE, f"the engine unit failed ({type(e).__name__}); "
                                                            f"send the request again"), False
            if event is None:
                event = Failed(Code.UNAVAILABLE, "the engine unit ended the request without a result; send it again")
            ended = from_unit and isinstance(event, Finished | Failed)
            yield event
            if isinstance(event, Finished | Failed):
                return
    finally:
        inflight[rid] -= 1
        if inflight[rid] <= 0:
            del inflight[rid]
        if not ended:  # the client left, the server is stopping, ...: free the request on rank 0
            response.cancel()


async def _next(events, hard_stop: asyncio.Event) -> tuple[object | None, bool]:
    """(the next event or None at the end, True), or (an UNAVAILABLE failure, False) when the server stops
    waiting."""
    nxt = asyncio.ensure_future(events.__anext__())
    stop = asyncio.ensure_future(hard_stop.wait())
    try:
        done, _ = await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
        if nxt in done:
            try:
                return nxt.result(), True
            except StopAsyncIteration:
                return None, True
        return Failed(Code.UNAVAILABLE, "the server shut down before the request finished; send it again"), False
    finally:
        stop.cancel()
        if not nxt.done():
            nxt.cancel()
