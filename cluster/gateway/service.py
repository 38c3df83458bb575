"""The DGServe servicer: validates, forwards to an engine unit through its DeploymentHandle, streams back."""

from __future__ import annotations

import asyncio
import logging
import uuid

import grpc

from dgserve.model.errors import DGServeError
from dgserve.model.tokenizer import chat_prompt_ids
from dgserve_client.v1 import dgserve_pb2 as pb
from dgserve_client.v1 import dgserve_pb2_grpc as pb_grpc

from ..engine.errors import Code
from ..engine.events import Failed, Finished
from .convert import final_message, stream_message, to_request

log = logging.getLogger("dgserve.gateway")

STATUS = {Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
          Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
          Code.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED, Code.CANCELLED: grpc.StatusCode.CANCELLED,
          Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE, Code.INTERNAL: grpc.StatusCode.INTERNAL}


def request_id_of(context) -> str:
    given = dict(context.invocation_metadata() or ()).get("x-request-id", "")
    return given if 0 < len(given) <= 128 and given.isprintable() else uuid.uuid4().hex


class DGServeService(pb_grpc.DGServeServicer):
    def __init__(self, gateway):
        self.gw = gateway

    async def Generate(self, request, context):
        rid = await self._begin(context)
        final = None
        async for final in self._events(request, context, rid):  # noqa: B007 (the last one is the result)
            pass
        event, prompt_tokens = final
        return final_message(event, rid, prompt_tokens, self.gw.pad)

    async def GenerateStream(self, request, context):
        rid = await self._begin(context)
        async for event, prompt_tokens in self._events(request, context, rid):
            yield stream_message(event, rid, prompt_tokens, self.gw.pad)

    async def Tokenize(self, request, context):
        rid = await self._begin(context)
        try:
            if request.chat:
                ids = chat_prompt_ids(self.gw.tokenizer, request.text, enable_thinking=request.thinking)
            else:
                ids = self.gw.tokenizer.encode(request.text, add_special_tokens=False)
        except DGServeError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {rid}: {e}")
        return pb.TokenizeResponse(token_ids=ids)

    async def GetModelInfo(self, request, context):
        await self._begin(context)
        return self.gw.info

    # -- plumbing --------------------------------------------------------------------------------------------
    async def _begin(self, context) -> str:
        rid = request_id_of(context)
        await context.send_initial_metadata((("x-request-id", rid),))
        context.set_trailing_metadata((("x-request-id", rid),))
        if self.gw.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"request {rid}: the server is shutting down; "
                                                             "send it again (another replica will take it)")
        return rid

    async def _events(self, request, context, rid: str):
        """(event, prompt tokens) until the Finished event; every failure becomes an abort with its code."""
        try:
            req = to_request(request, rid, self.gw.tokenizer, self.gw.limits, self.gw.defaults,
                             self.gw.topo.sampler, context.time_remaining())
        except DGServeError as e:
            log.info("request %s: refused: %s", rid, e)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {rid}: {e}")
        n_prompt = len(req.prompt_ids)
        log.info("request %s: %d prompt tokens, seed %d", rid, n_prompt, req.seed)
        response = self.gw.unit.options(stream=True).generate.remote(req)
        self.gw.inflight.add(rid)
        events = response.__aiter__()
        try:
            while True:
                try:
                    event = await self._next(events)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # the unit's replica died, Serve refused or cancelled the call, ...
                    log.warning("request %s: the engine unit failed: %r", rid, e)
                    event = Failed(Code.UNAVAILABLE, f"the engine unit failed ({type(e).__name__}); send the "
                                                     f"request again")
                if event is None:
                    event = Failed(Code.UNAVAILABLE, "the engine unit ended the request without a result; send "
                                                     "it again")
                if isinstance(event, Failed):
                    log.info("request %s: %s %s", rid, event.code.value, event.message)
                    await context.abort(STATUS.get(event.code, grpc.StatusCode.INTERNAL),
                                        f"request {rid}: {event.message}")
                yield event, n_prompt
                if isinstance(event, Finished):
                    log.info("request %s: done, %d tokens in %.3fs", rid, len(event.token_ids), event.stats.total_s)
                    return
        finally:
            self.gw.inflight.discard(rid)
            response.cancel()  # a no-op once it ended; otherwise frees the request on rank 0

    async def _next(self, events):
        """The next event (None at the end), or an UNAVAILABLE failure when the server stops waiting."""
        nxt = asyncio.ensure_future(events.__anext__())
        stop = asyncio.ensure_future(self.gw.hard_stop.wait())
        try:
            done, _ = await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
            if nxt in done:
                try:
                    return nxt.result()
                except StopAsyncIteration:
                    return None
            return Failed(Code.UNAVAILABLE, "the server shut down before the request finished; send it again")
        finally:
            stop.cancel()
            if not nxt.done():
                nxt.cancel()
