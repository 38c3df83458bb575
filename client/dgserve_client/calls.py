"""What the sync and asyncio clients share: the constructor (channel, stubs, settings) and each call's retry
decisions. The clients keep only what differs by language: `for` or `async for`, `time.sleep` or
`await asyncio.sleep`."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from types import ModuleType

import grpc
from grpc_health.v1 import health_pb2_grpc

from .errors import InvalidArgument, from_rpc_error, pushback_s
from .request import check_api, metadata
from .security import TLS, api_key_metadata
from .v1 import dgserve_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MESSAGE_OPTIONS = (("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES))
KEEPALIVE_OPTIONS = (("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000))
RETRY_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
TOO_LARGE = "larger than max"  # in gRPC's message for a request over the server's size limit: never retried


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with equal jitter: at least half of each step, so a run of retries spans a known time
    (full jitter can spend a whole retry budget in a second)."""
    step = min(cap, base * 2 ** attempt)
    return random.uniform(step / 2, step)


class Attempts:
    """One call's attempts, and the one place that decides, after a failure, whether to retry (and after what
    pause) or to raise the typed error. Each attempt runs in a `with` block:

        with attempts:                                       # a unary call
            return method(req, **attempts.call_options())
        sleep(attempts.pause)                                # reached only when the attempt is to be retried

        with attempts.stream(stub.GenerateStream, req) as call:
            for msg in call:
                yield attempts.received(msg)
            return
        sleep(attempts.pause)

    The block ends by cancelling the attempt's stream (a no-op once it is done; it frees the request on the server
    when the caller stopped early). A retriable gRPC error is swallowed, with `pause` set; any other error leaves
    the block as the typed error (`errors.py`), and anything that is not a gRPC error leaves it unchanged. The
    request id stays the same across the attempts."""

    def __init__(self, client: ClientBase, request_id: str | None, timeout: float | None):
        self.client = client
        self.metadata = metadata(request_id, client.extra_metadata)
        self.request_id = self.metadata[0][1]
        t = timeout if timeout is not None else client.timeout
        self.deadline = None if t is None else time.monotonic() + t
        self.attempt = 0
        self.pause = 0.0
        self.first_failure: float | None = None
        self.call = None
        self._received = False

    def call_options(self) -> dict:
        """The keyword arguments of the next attempt: what is left of the deadline, and the metadata."""
        left = None if self.deadline is None else max(0.001, self.deadline - time.monotonic())
        return {"timeout": left, "metadata": self.metadata}

    def stream(self, method, req) -> Attempts:
        """Starts a streaming attempt; `with` it to get the call."""
        self.call = method(req, **self.call_options())
        return self

    def received(self, msg):
        """Notes that the stream has delivered a message (so it is no longer retried) and returns it."""
        self._received = True
        return msg

    def __enter__(self):
        return self.call

    def __exit__(self, typ, e, tb) -> bool:
        call, self.call = self.call, None
        if call is not None:
            call.cancel()
        if not isinstance(e, grpc.RpcError):
            return False
        self.pause = self._retry_after(e)
        return True

    def _retry_after(self, e: grpc.RpcError) -> float:
        """The pause (seconds) before the next attempt, or raises the typed error.

        Only UNAVAILABLE and RESOURCE_EXHAUSTED are retried, at most `retries` times, for at most `retry_window_s`
        after the first failure (the default outlasts a unit's or the gateway's rebuild, measured at 9-21 s), and
        only while more than `backoff_s` of the deadline is left; a stream that has delivered a message is never
        retried (its messages would come twice). The pause is the backoff, or the server's retry hint
        (grpc-retry-pushback-ms) when that is longer, and leaves the next attempt at least half of what is left of
        the deadline."""
        now = time.monotonic()
        c, left = self.client, None if self.deadline is None else self.deadline - now
        self.first_failure = now if self.first_failure is None else self.first_failure
        too_large = TOO_LARGE in (e.details() or "")  # gRPC's RESOURCE_EXHAUSTED for a message over the limit
        if (self._received or too_large or e.code().name not in RETRY_CODES or self.attempt >= c.retries
                or now - self.first_failure >= c.retry_window_s or (left is not None and left <= c.backoff_s)):
            raise from_rpc_error(e, self.request_id) from None
        wait = max(backoff(self.attempt, c.backoff_s, c.backoff_cap_s), pushback_s(e) or 0.0)
        self.attempt += 1
        return wait if left is None else min(wait, max(0.0, left / 2))


class ClientBase:
    """The constructor both clients share. `timeout` is each call's deadline in seconds; retriable errors are
    retried with exponential backoff (up to `retries` times, for up to `retry_window_s` after the first failure)
    while the deadline allows.

    `api_key` is sent as `authorization: Bearer <key>` (default: the DGSERVE_API_KEY environment variable); `tls`
    (a `TLS`, or True for the system's roots) makes the channel secure; `credentials` gives ready-made channel
    credentials instead. `insecure=True` allows an API key over plaintext to another machine."""

    _grpc: ModuleType = grpc            # where channels come from: grpc, or grpc.aio
    _options: tuple = MESSAGE_OPTIONS   # channel options

    def __init__(self, target: str, timeout: float | None = 600.0, retries: int = 50, backoff_s: float = 0.2,
                 backoff_cap_s: float = 2.0, credentials: grpc.ChannelCredentials | None = None,
                 metadata: Sequence[tuple[str, str]] = (), check_version: bool = True, *,
                 api_key: str | None = None, tls: TLS | bool | None = None, insecure: bool = False,
                 retry_window_s: float = 45.0):
        if tls is True:
            tls = TLS()
        options = self._options + (tls.options() if tls else ())
        if tls and credentials is None:
            credentials = tls.credentials()
        auth = api_key_metadata(api_key, target, credentials is not None, insecure)
        self.channel = (self._grpc.secure_channel(target, credentials, options) if credentials
                        else self._grpc.insecure_channel(target, options))
        self.stub = pb_grpc.DGServeStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout, self.retries, self.backoff_s, self.backoff_cap_s = timeout, retries, backoff_s, backoff_cap_s
        self.retry_window_s = retry_window_s
        self.extra_metadata = (*metadata, *auth)
        self._version_checked = not check_version
        self._max_request_bytes = 0  # unknown until GetModelInfo answers

    def _attempts(self, request_id: str | None, timeout: float | None, req=None) -> Attempts:
        """A call's attempts; a request larger than the server accepts (GetModelInfo's limits.max_request_bytes,
        known once the first call checked the API version) is refused here, without sending it."""
        attempts = Attempts(self, request_id, timeout)
        size = 0 if req is None else req.ByteSize()
        if 0 < self._max_request_bytes < size:
            raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"the request is {size} bytes, more than the server accepts "
                                  f"({self._max_request_bytes} bytes: limits.max_request_bytes)", attempts.request_id)
        return attempts

    def _learn(self, info) -> None:
        """What the first call's GetModelInfo tells every later call."""
        check_api(info)
        self._max_request_bytes = info.limits.max_request_bytes
        self._version_checked = True
