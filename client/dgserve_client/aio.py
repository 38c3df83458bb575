"""The asyncio client: the same calls as `Client`, as coroutines and async iterators."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .client import MAX_MESSAGE_BYTES
from .errors import from_rpc_error
from .request import RetryPolicy, build_request, check_api, metadata
from .v1 import dgserve_pb2 as pb
from .v1 import dgserve_pb2_grpc as pb_grpc


class AsyncClient(RetryPolicy):
    def __init__(self, target: str, timeout: float | None = 600.0, retries: int = 5, backoff_s: float = 0.2,
                 backoff_cap_s: float = 5.0, credentials: grpc.ChannelCredentials | None = None,
                 metadata: Sequence[tuple[str, str]] = (), check_version: bool = True):
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        self.channel = (grpc.aio.secure_channel(target, credentials, opts) if credentials
                        else grpc.aio.insecure_channel(target, opts))
        self.stub = pb_grpc.DGServeStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout, self.retries, self.backoff_s, self.backoff_cap_s = timeout, retries, backoff_s, backoff_cap_s
        self.extra_metadata = tuple(metadata)
        self._version_checked = not check_version

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
        await self._check_version()
        req = build_request(prompt, token_ids, seed, stream_drafts, thinking, **knobs)
        md = metadata(request_id, self.extra_metadata)
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            call = self.stub.GenerateStream(req, timeout=self._left(deadline), metadata=md)
            received = False
            try:
                async for msg in call:
                    received = True
                    yield msg
                return
            except grpc.RpcError as e:
                if received or not self._should_retry(e, attempt, deadline):
                    raise from_rpc_error(e, md[0][1]) from None
            finally:
                call.cancel()
            await asyncio.sleep(self._pause(attempt, deadline))
            attempt += 1

    async def tokenize(self, text: str, chat: bool = False, thinking: bool = False) -> list[int]:
        r = await self._unary(self.stub.Tokenize, pb.TokenizeRequest(text=text, chat=chat, thinking=thinking),
                              None, None)
        return list(r.token_ids)

    async def info(self) -> pb.ModelInfo:
        return await self._unary(self.stub.GetModelInfo, pb.GetModelInfoRequest(), None, None, check=False)

    async def health(self, service: str = "", timeout: float = 5.0) -> str:
        try:
            r = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    async def _check_version(self) -> None:
        if not self._version_checked:
            check_api(await self.info())
            self._version_checked = True

    async def _unary(self, method, req, request_id, timeout, check: bool = True):
        if check:
            await self._check_version()
        md = metadata(request_id, self.extra_metadata)
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                return await method(req, timeout=self._left(deadline), metadata=md)
            except grpc.RpcError as e:
                if not self._should_retry(e, attempt, deadline):
                    raise from_rpc_error(e, md[0][1]) from None
            await asyncio.sleep(self._pause(attempt, deadline))
            attempt += 1
