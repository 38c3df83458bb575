"""The synchronous client. The constructor and the retry decisions are shared with the asyncio client
(`calls.py`); what is here is only the synchronous shell around them."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2

from .calls import KEEPALIVE_OPTIONS, MAX_MESSAGE_BYTES, MESSAGE_OPTIONS, ClientBase
from .errors import from_rpc_error
from .request import build_chat_request, build_request
from .v1 import dgserve_pb2 as pb

__all__ = ["MAX_MESSAGE_BYTES", "Client"]


class Client(ClientBase):
    """A dgserve client. `timeout` is each call's deadline in seconds; retriable errors are retried with
    exponential backoff (up to `retries` times) while the deadline allows."""

    _grpc = grpc
    _options = MESSAGE_OPTIONS + KEEPALIVE_OPTIONS

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- calls -----------------------------------------------------------------------------------------------
    def generate(self, prompt: str | None = None, token_ids: Sequence[int] | None = None, *,
                 seed: int | None = None, thinking: bool = False, request_id: str | None = None,
                 timeout: float | None = None, **knobs) -> pb.GenerateResponse:
        req = build_request(prompt, token_ids, seed, False, thinking, **knobs)
        return self._unary(self.stub.Generate, req, request_id, timeout)

    def generate_stream(self, prompt: str | None = None, token_ids: Sequence[int] | None = None, *,
                        seed: int | None = None, thinking: bool = False, stream_drafts: bool = False,
                        request_id: str | None = None, timeout: float | None = None,
                        **knobs) -> Iterator[pb.GenerateStreamResponse]:
        """Messages as they come; retried (with backoff) only until the first one arrives."""
        self._check_version()
        req = build_request(prompt, token_ids, seed, stream_drafts, thinking, **knobs)
        yield from self._stream(self.stub.GenerateStream, req, request_id, timeout)

    def chat(self, messages: Sequence[dict], tools: Sequence[dict] | None = None, *, seed: int | None = None,
             thinking: bool = False, request_id: str | None = None, timeout: float | None = None,
             **knobs) -> pb.ChatResponse:
        """One chat turn: the reply's content, reasoning (thinking mode) and tool calls."""
        req = build_chat_request(messages, tools, seed, thinking, **knobs)
        return self._unary(self.stub.Chat, req, request_id, timeout)

    def chat_stream(self, messages: Sequence[dict], tools: Sequence[dict] | None = None, *,
                    seed: int | None = None, thinking: bool = False, request_id: str | None = None,
                    timeout: float | None = None, **knobs) -> Iterator[pb.ChatStreamResponse]:
        """A delta per committed block, then the final reply; retried only until the first message arrives."""
        self._check_version()
        req = build_chat_request(messages, tools, seed, thinking, **knobs)
        yield from self._stream(self.stub.ChatStream, req, request_id, timeout)

    def _stream(self, method, req, request_id, timeout) -> Iterator:
        """A server stream's messages; retried (with backoff) only until the first one arrives."""
        attempts = self._attempts(request_id, timeout, req)
        while True:
            with attempts.stream(method, req) as call:
                for msg in call:
                    yield attempts.received(msg)
                return
            time.sleep(attempts.pause)

    def tokenize(self, text: str, chat: bool = False, thinking: bool = False) -> list[int]:
        r = self._unary(self.stub.Tokenize, pb.TokenizeRequest(text=text, chat=chat, thinking=thinking), None, None)
        return list(r.token_ids)

    def info(self) -> pb.ModelInfo:
        return self._unary(self.stub.GetModelInfo, pb.GetModelInfoRequest(), None, None, check=False)

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """SERVING | NOT_SERVING | SERVICE_UNKNOWN (raises Unavailable when the server cannot be reached)."""
        try:
            r = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    # -- plumbing --------------------------------------------------------------------------------------------
    def _check_version(self) -> None:
        if not self._version_checked:
            self._learn(self.info())

    def _unary(self, method, req, request_id, timeout, check: bool = True):
        if check:
            self._check_version()
        attempts = self._attempts(request_id, timeout, req)
        while True:
            with attempts:
                return method(req, **attempts.call_options())
            time.sleep(attempts.pause)
