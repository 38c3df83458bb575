"""The HTTP API's work, apart from FastAPI: a body checked and rendered (off the event loop) into the engine's
request, the request's events from a unit, and OpenAI's response bodies or server-sent events built from them.

Everything that can be refused is refused before the response starts, with its status: a bad field (400), a
model this server does not serve (404), a full queue (429 with Retry-After; the first event is awaited before a
stream's headers go out), a server that is stopping (503). Once a stream has started, a failure is sent as an
`error` event, then `[DONE]`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator

from dgserve.model.errors import DGServeError
from dgserve_client.v1 import dgserve_pb2 as pb

from ...engine.events import BlockCommitted, Failed, Finished
from ...messages import GenerateRequest
from ..chat.grpc import ChatTurn
from ..chat.messages import check_size, parse_conversation, prompt_of
from ..convert import check_text, final_message, to_request
from ..detok import Detokenizer
from ..front import Front, unit_events
from ..text import TextWorker
from . import responses as out
from .errors import ApiError, from_code, from_error
from .schema import ChatCompletionRequest, CompletionRequest, Request

log = logging.getLogger("dgserve.http")


def render_chat(tokenizer, processor, body: ChatCompletionRequest, max_text_bytes: int, max_tokens: int,
                max_media_bytes: int | None = None) -> tuple[list[int], tuple]:
    """The chat core on an OpenAI body: OpenAI's `developer` role is the system role; with tool_choice "none" the
    tools are not shown to the model. Returns the prompt ids and the processed images and frames."""
    tools = None if body.tool_choice == "none" else body.tools
    check_size(body.messages, tools, max_text_bytes)
    messages = [{**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m
                for m in body.messages]
    return prompt_of(tokenizer, processor, parse_conversation(messages, tools, body.thinking), max_tokens,
                     max_media_bytes)


def encode_text(tokenizer, text: str) -> list[int]:
    """A completion prompt: raw text (no chat template), with the tokenizer's <bos>."""
    if tokenizer is None:
        raise DGServeError("prompt: this checkpoint has no tokenizer files; send token ids")
    return tokenizer.encode(text, add_special_tokens=True)


class OpenAIService:
    def __init__(self, front: Front, unit, caller=None, serving=None):
        """`serving()`: an awaitable check that the endpoint can serve (the gRPC gateway's verdict)."""
        self.front, self.unit, self.caller, self._serving = front, unit, caller, serving
        self.text = TextWorker()
        self.inflight: Counter[str] = Counter()
        self.hard_stop = asyncio.Event()
        self.draining = False
        self.created = int(time.time())
        self.retry_after_s = front.topo.gateway.retry_pushback_ms / 1000

    @property
    def model_id(self) -> str:
        return self.front.topo.served_model_name

    async def serving(self) -> tuple[bool, str]:
        if self.draining:
            return False, "the server is shutting down"
        if self._serving is None:
            return True, "serving"
        return await self._serving()

    # -- requests --------------------------------------------------------------------------------------------
    def _check(self, body: Request) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down; send the request again (another replica will take "
                                "it)", code="unavailable", retry_after_s=self.retry_after_s)
        if body.model != self.model_id:
            raise ApiError(404, f"model: {body.model!r} is not served here; this server serves {self.model_id!r} "
                                f"(GET /v1/models)", "model", "model_not_found")

    def _request(self, body: Request, rid: str, tenant: str, text_ids: list[int] | None,
                 token_ids=None, media: tuple = ()) -> GenerateRequest:
        msg = pb.GenerateRequest(sampler=pb.SamplerParams(**body.sampler()))
        if token_ids is not None:
            msg.token_ids.ids.extend(token_ids)
        if body.seed is not None:
            msg.seed = body.seed
        f = self.front
        return to_request(msg, rid, text_ids, f.limits, f.defaults, f.topo.sampler, f.topo.serve.max_request_s,
                          tenant, media)

    async def _prepare(self, body: Request, rid: str, tenant: str) -> GenerateRequest:
        self._check(body)
        f, limits = self.front, self.front.limits
        try:
            if isinstance(body, ChatCompletionRequest):
                ids, media = await self.text.run(render_chat, f.tokenizer, f.media, body, limits.max_text_bytes,
                                                 limits.max_prompt_tokens, limits.max_media_bytes)
                return self._request(body, rid, tenant, ids, media=media)
            if isinstance(body.prompt, str):
                check_text(body.prompt, limits, "prompt")
                return self._request(body, rid, tenant, await self.text.run(encode_text, f.tokenizer, body.prompt))
            return self._request(body, rid, tenant, None, body.prompt)
        except DGServeError as e:
            raise from_error(e, self.retry_after_s) from None

    async def _open(self, body: Request, rid: str, tenant: str):
        """The engine request and its events, with the first event already read: a refusal is raised here."""
        req = await self._prepare(body, rid, tenant)
        log.info("request %s: %d prompt tokens, seed %d (HTTP)", rid, len(req.prompt_ids), req.seed)
        events = unit_events(self.unit, req, self.caller, self.hard_stop, self.inflight)
        first = await events.__anext__()
        if isinstance(first, Failed):
            await events.aclose()
            raise from_code(first.code, first.message, self.retry_after_s)
        return req, first, events

    async def _all(self, first, events) -> tuple[list, Finished]:
        blocks, event = [], first
        try:
            while not isinstance(event, Finished):
                if isinstance(event, Failed):
                    raise from_code(event.code, event.message, self.retry_after_s)
                blocks.append(event)
                event = await events.__anext__()
        finally:
            await events.aclose()
        return blocks, event

    # -- chat ------------------------------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest, rid: str, tenant: str = "") -> dict:
        req, first, events = await self._open(body, rid, tenant)
        blocks, done = await self._all(first, events)
        turn = ChatTurn(self.front.tokenizer, self.front.pad, rid)
        for b in blocks:
            if isinstance(b, BlockCommitted):
                turn.block(b.block, b.token_ids)
        final = turn.final(done, rid, *self._usage_stats(done, req))[1]
        return out.chat_completion(out.Head("chatcmpl", rid, self.model_id, int(time.time())), final,
                                   body.return_token_ids)

    async def chat_stream(self, body: ChatCompletionRequest, rid: str, tenant: str = "") -> AsyncIterator[str]:
        req, first, events = await self._open(body, rid, tenant)
        return self._chat_events(body, rid, req, first, events)

    def _chat_events(self, body, rid, req, first, events) -> AsyncIterator[str]:
        head = out.Head("chatcmpl", rid, self.model_id, int(time.time()))
        turn, calls = ChatTurn(self.front.tokenizer, self.front.pad, rid), [0]
        usage = body.stream_options is not None and body.stream_options.include_usage
        null_usage = {"usage": None} if usage else {}  # OpenAI's chunks say usage: null until the last one

        def block(event: BlockCommitted):
            delta = out.chat_delta(turn.block(event.block, event.token_ids), calls[0])
            calls[0] += len(delta.get("tool_calls", ()))
            return [out.chat_chunk(head, delta, **null_usage)] if delta else []

        def end(event: Finished):
            tail, final = turn.final(event, rid, *self._usage_stats(event, req))
            delta = out.chat_delta(tail, calls[0])
            chunks = [out.chat_chunk(head, delta, **null_usage)] if delta else []
            extra = {**null_usage, **({"token_ids": list(final.token_ids)} if body.return_token_ids else {})}
            chunks.append(out.chat_chunk(head, {}, final.finish_reason, **extra))
            if usage:
                chunks.append(out.sse(head.body("chat.completion.chunk", [], usage=out.usage(final.usage))))
            return chunks

        opening = out.chat_chunk(head, {"role": "assistant", "content": ""}, **null_usage)
        return self._sse(rid, first, events, block, end, opening)

    # -- completions -----------------------------------------------------------------------------------------
    async def complete(self, body: CompletionRequest, rid: str, tenant: str = "") -> dict:
        req, first, events = await self._open(body, rid, tenant)
        _, done = await self._all(first, events)
        text = Detokenizer(self.front.tokenizer, self.front.pad, skip_special_tokens=True)
        final = final_message(done, rid, len(req.prompt_ids), self.front.pad)
        return out.completion(out.Head("cmpl", rid, self.model_id, int(time.time())), final,
                              text.feed(done.token_ids), body.return_token_ids)

    async def complete_stream(self, body: CompletionRequest, rid: str, tenant: str = "") -> AsyncIterator[str]:
        req, first, events = await self._open(body, rid, tenant)
        return self._completion_events(body, rid, req, first, events)

    def _completion_events(self, body, rid, req, first, events) -> AsyncIterator[str]:
        head = out.Head("cmpl", rid, self.model_id, int(time.time()))
        text = Detokenizer(self.front.tokenizer, self.front.pad, skip_special_tokens=True)
        usage = body.stream_options is not None and body.stream_options.include_usage

        def block(event: BlockCommitted):
            piece = text.feed(event.token_ids)
            return [out.completion_chunk(head, piece)] if piece else []

        def end(event: Finished):
            final = final_message(event, rid, len(req.prompt_ids), self.front.pad)
            extra = {"token_ids": list(final.token_ids)} if body.return_token_ids else {}
            chunks = [out.completion_chunk(head, "", out.finish_reason(final.finish_reason), **extra)]
            if usage:
                chunks.append(out.sse(head.body("text_completion", [], usage=out.usage(final.usage))))
            return chunks

        return self._sse(rid, first, events, block, end)

    async def _sse(self, rid: str, first, events, block, end, opening: str | None = None) -> AsyncIterator[str]:
        """Server-sent events from a request's events: `block(event)` gives a committed block's chunks and
        `end(finished)` the last ones, then `[DONE]`; a failure gives an error event, then `[DONE]`. The unit's call
        is closed however the stream ends (the client may leave at any point)."""
        event = first
        try:
            if opening is not None:
                yield opening
            while True:
                if isinstance(event, BlockCommitted):
                    for chunk in block(event):
                        yield chunk
                elif isinstance(event, Finished):
                    for chunk in end(event):
                        yield chunk
                    yield out.DONE
                    return
                elif isinstance(event, Failed):
                    yield self._stream_error(event, rid)
                    return
                event = await events.__anext__()
        finally:
            await events.aclose()

    # -- plumbing --------------------------------------------------------------------------------------------
    def _usage_stats(self, done: Finished, req: GenerateRequest) -> tuple[pb.Usage, pb.Stats]:
        m = final_message(done, req.request_id, len(req.prompt_ids), self.front.pad)
        return m.usage, m.stats

    def _stream_error(self, event: Failed, rid: str) -> str:
        log.info("request %s: %s %s (HTTP stream)", rid, event.code.value, event.message)
        return out.sse(from_code(event.code, event.message, self.retry_after_s).body(rid)) + out.DONE

    async def drain(self, grace_s: float) -> list[str]:
        """Refuse new requests, give in-flight ones `grace_s`, then end the rest (their streams get an error)."""
        self.draining = True
        t0 = time.monotonic()
        while self.inflight and time.monotonic() - t0 < grace_s:
            await asyncio.sleep(0.05)
        left = sorted(self.inflight.elements())
        self.hard_stop.set()
        await asyncio.sleep(0.2)
        self.text.close()
        return left
