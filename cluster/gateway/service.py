"""The DGServe servicer: validates, forwards to an engine unit through its DeploymentHandle, streams back."""

from __future__ import annotations

import logging

import grpc

from dgserve.model.errors import DGServeError
from dgserve.model.tokenizer import chat_prompt_ids
from dgserve_client.v1 import dgserve_pb2 as pb
from dgserve_client.v1 import dgserve_pb2_grpc as pb_grpc

from ..engine.errors import Code, EngineError
from ..engine.events import BlockCommitted, Failed, Finished
from .chat.grpc import ChatTurn, chat_prompt
from .convert import check_text, final_message, prompt_text, stream_message, text_prompt_ids, to_request
from .front import request_id, unit_events
from .security import bearer_key, tenant_of

log = logging.getLogger("dgserve.gateway")

STATUS = {Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
          Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED, Code.OUT_OF_RANGE: grpc.StatusCode.OUT_OF_RANGE,
          Code.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED, Code.CANCELLED: grpc.StatusCode.CANCELLED,
          Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE, Code.INTERNAL: grpc.StatusCode.INTERNAL}


PUSHBACK = "grpc-retry-pushback-ms"  # the retry hint of a RESOURCE_EXHAUSTED answer (gRPC's retry design, A6)


def request_id_of(context) -> str:
    return request_id(dict(context.invocation_metadata() or ()).get("x-request-id", ""))


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

    async def Chat(self, request, context):
        rid = await self._begin(context)
        turn = ChatTurn(self.gw.tokenizer, self.gw.pad, rid)
        async for event, prompt_tokens in self._events(request, context, rid):
            if isinstance(event, BlockCommitted):
                turn.block(event.block, event.token_ids)
            elif isinstance(event, Finished):
                done = final_message(event, rid, prompt_tokens, self.gw.pad)
                return turn.final(event, rid, done.usage, done.stats)[1]

    async def ChatStream(self, request, context):
        rid = await self._begin(context)
        turn = ChatTurn(self.gw.tokenizer, self.gw.pad, rid)
        async for event, prompt_tokens in self._events(request, context, rid):
            if isinstance(event, BlockCommitted):
                yield pb.ChatStreamResponse(request_id=rid, delta=turn.block(event.block, event.token_ids))
            elif isinstance(event, Finished):
                done = final_message(event, rid, prompt_tokens, self.gw.pad)
                tail, final = turn.final(event, rid, done.usage, done.stats)
                if tail.content or tail.reasoning or tail.tool_calls:
                    yield pb.ChatStreamResponse(request_id=rid, delta=tail)
                yield pb.ChatStreamResponse(request_id=rid, final=final)

    async def Tokenize(self, request, context):
        rid = await self._begin(context)
        if not request.text and not request.chat:
            return pb.TokenizeResponse()
        try:
            check_text(request.text, self.gw.limits, "text")
            ids = await self.gw.text.run(_tokenize, self.gw.tokenizer, request)
        except DGServeError as e:
            await self._refuse(context, rid, e)
        return pb.TokenizeResponse(token_ids=ids)

    async def GetModelInfo(self, request, context):
        await self._begin(context)
        verdict = getattr(self.gw, "last_verdict", None)
        if verdict is None or not verdict.all_to_all:
            return self.gw.info
        info = pb.ModelInfo()
        info.CopyFrom(self.gw.info)  # plus what the serving unit measured when it started
        info.topology.all_to_all.extend(pb.AllToAllRow(bytes=r["bytes"], time_us=r["time_us"],
                                                       algbw_gbs=r["algbw_gbs"], busbw_gbs=r["busbw_gbs"])
                                        for r in verdict.all_to_all)
        return info

    # -- plumbing --------------------------------------------------------------------------------------------
    async def _begin(self, context) -> str:
        rid = request_id_of(context)
        await context.send_initial_metadata((("x-request-id", rid),))
        context.set_trailing_metadata((("x-request-id", rid),))
        if self.gw.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"request {rid}: the server is shutting down; "
                                                             "send it again (another replica will take it)")
        return rid

    async def _refuse(self, context, rid: str, error: DGServeError):
        """A request refused before it reached a unit: a bad field (INVALID_ARGUMENT) or a busy tokenizer."""
        code = STATUS[error.code] if isinstance(error, EngineError) else grpc.StatusCode.INVALID_ARGUMENT
        log.info("request %s: refused (%s): %s", rid, code.name, error)
        await context.abort(code, f"request {rid}: {error}")

    async def _events(self, request, context, rid: str):
        """(event, prompt tokens) until the Finished event; a failure becomes an abort with its code."""
        try:
            req = await self._prepare(request, context, rid)
        except DGServeError as e:
            await self._refuse(context, rid, e)
        n_prompt = len(req.prompt_ids)
        log.info("request %s: %d prompt tokens, seed %d", rid, n_prompt, req.seed)
        async for event in unit_events(self.gw.unit, req, self.gw.caller, self.gw.hard_stop, self.gw.inflight):
            if isinstance(event, Failed):
                log.info("request %s: %s %s", rid, event.code.value, event.message)
                if event.code is Code.RESOURCE_EXHAUSTED:  # busy: say when to come back
                    context.set_trailing_metadata((("x-request-id", rid),
                                                   (PUSHBACK, str(self.gw.topo.gateway.retry_pushback_ms))))
                await context.abort(STATUS.get(event.code, grpc.StatusCode.INTERNAL), f"request {rid}: {event.message}")
            yield event, n_prompt
            if isinstance(event, Finished):
                log.info("request %s: done, %d tokens in %.3fs", rid, len(event.token_ids), event.stats.total_s)

    async def _prepare(self, request, context, rid: str):
        """The engine request of a Generate or Chat call: prompt ids (rendered off the event loop), checked knobs
        and the deadline (the client's, capped to the longest a request may run)."""
        limits = self.gw.limits
        if isinstance(request, pb.ChatRequest):
            text_ids, media = await self.gw.text.run(chat_prompt, self.gw.tokenizer, self.gw.media, request,
                                                     limits.max_text_bytes, limits.max_prompt_tokens,
                                                     limits.max_media_bytes)
            gen = pb.GenerateRequest(sampler=request.sampler)
            if request.HasField("seed"):
                gen.seed = request.seed
            request = gen
        else:
            media = ()
            text = prompt_text(request, limits)
            text_ids = None if text is None else await self.gw.text.run(text_prompt_ids, self.gw.tokenizer, request)
        left = context.time_remaining()
        cap = self.gw.topo.serve.max_request_s
        return to_request(request, rid, text_ids, limits, self.gw.defaults, self.gw.topo.sampler,
                          cap if left is None else min(left, cap), tenant_of(bearer_key(context.invocation_metadata())),
                          media)


def _tokenize(tokenizer, request: pb.TokenizeRequest) -> list[int]:
    if request.chat:
        return chat_prompt_ids(tokenizer, request.text, enable_thinking=request.thinking)
    if tokenizer is None:
        raise DGServeError("text: this checkpoint has no tokenizer files")
    return tokenizer.encode(request.text, add_special_tokens=False)
