"""The asyncio client: the same calls as `Client`, as coroutines and async iterators. The constructor and the
retry decisions are shared (`calls.py`); what is here is only the asyncio shell around them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health_pb2

from .calls import MESSAGE_OPTIONS, ClientBase
from .errors import from_rpc_error
from .request import build_chat_request, build_request
from .v1 import dgserve_pb2 as pb


class AsyncClient(ClientBase):
    _grpc = grpc.aio
    _options = MESSAGE_OPTIONS  # as before: no client keepalive pings (the sync client sends them)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def generate(self, prompt: str | None = None, token_ids: Sequence[int] | None = None, *,
                       seed: int | None = None, thinking: bool = False, request_id: str | None = None,
                       timeout: float | None = None, **knobs) -> pb.GenerateResponse:
        req = build_request(prompt, token_ids, seed, False, thinking, **knobs)
        return await self._unary(self.stub.Generate, req, request_id, timeout)

    async def generate_stream(self, prompt: str | None = None, token_ids: Sequence[int] | None = None, *,
                              seed: int | None = None, thinking: bool = False, stream_drafts: bool = False,
                              request_id: str | None = None, timeout: float | None = None,
                              **knobs) -> AsyncIterator[pb.GenerateStreamResponse]:
        """Messages as they come; retried (with backoff) only until the first one arrives."""
        await self._check_version()
        req = build_request(prompt, token_ids, seed, stream_drafts, thinking, **knobs)
        async for msg in self._stream(self.stub.GenerateStream, req, request_id, timeout):
            yield msg

    async def chat(self, messages: Sequence[dict], tools: Sequence[dict] | None = None, *, seed: int | None = None,
                   thinking: bool = False, request_id: str | None = None, timeout: float | None = None,
                   **knobs) -> pb.ChatResponse:
        """One chat turn: the reply's content, reasoning (thinking mode) and tool calls."""
        req = build_chat_request(messages, tools, seed, thinking, **knobs)
        return await self._unary(self.stub.Chat, req, request_id, timeout)

    async def chat_stream(self, messages: Sequence[dict], tools: Sequence[dict] | None = None, *,
                          seed: int | None = None, thinking: bool = False, request_id: str | None = None,
                          timeout: float | None = None, **knobs) -> AsyncIterator[pb.ChatStreamResponse]:
        """A delta per committed block, then the final reply; retried only until the first message arrives."""
        await self._check_version()
        req = build_chat_request(messages, tools, seed, thinking, **knobs)
        async for msg in self._stream(self.stub.ChatStream, req, request_id, timeout):
            yield msg

    async def _stream(self, method, req, request_id, timeout) -> AsyncIterator:
        """A server stream's messages; retried (with backoff) only until the first one arrives."""
        attempts = self._attempts(request_id, timeout, req)
        while True:
            with attempts.stream(method, req) as call:
                async for msg in call:
                    yield attempts.received(msg)
                return
            await asyncio.sleep(attempts.pause)

    async def tokenize(self, text: str, chat: bool = False, thinking: bool = False) -> list[int]:
        r = await self._unary(self.stub.Tokenize, pb.TokenizeRequest(text=text, chat=chat, thinking=thinking),
                              None, None)
        return list(r.token_ids)

    async def info(self) -> pb.ModelInfo:
        return await self._unary(self.stub.GetModelInfo, pb.GetModelInfoRequest(), None, None, check=False)

    async def health(self, service: str = "", timeout: float = 5.0) -> str:
        """SERVING | NOT_SERVING | SERVICE_UNKNOWN (raises Unavailable when the server cannot be reached)."""
        try:
            r = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    async def _check_version(self) -> None:
        if not self._version_checked:
            self._learn(await self.info())

    async def _unary(self, method, req, request_id, timeout, check: bool = True):
        if check:
            await self._check_version()
        attempts = self._attempts(request_id, timeout, req)
        while True:
            with attempts:
                return await method(req, **attempts.call_options())
            await asyncio.sleep(attempts.pause)
