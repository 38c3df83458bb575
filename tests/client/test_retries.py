"""Client retries, backoff, deadlines and typed errors against a scripted in-process gRPC server, through the sync
and the asyncio client alike."""

from __future__ import annotations

import asyncio
import inspect
import time
from concurrent import futures

import grpc
import pytest

from dgserve_client import ApiVersionMismatch, Client, InvalidArgument, OutOfRange, ResourceExhausted, Unavailable
from dgserve_client.aio import AsyncClient
from dgserve_client.v1 import dgserve_pb2 as pb
from dgserve_client.v1 import dgserve_pb2_grpc as pb_grpc


class Scripted(pb_grpc.DGServeServicer):
    """Fails the first calls with the given codes, then answers."""

    def __init__(self, failures: list[grpc.StatusCode], api: str = "1.0", fail_after_first: bool = False,
                 pushback_ms: int | None = None):
        self.failures, self.api, self.calls, self.ids = list(failures), api, 0, []
        self.fail_after_first = fail_after_first  # streams: the failure comes after the first message
        self.pushback_ms, self.times = pushback_ms, []  # the retry hint sent with failures; when calls came

    def GetModelInfo(self, request, context):
        return pb.ModelInfo(api_version=self.api)

    def Generate(self, request, context):
        self.calls += 1
        self.times.append(time.monotonic())
        self.ids.append(dict(context.invocation_metadata()).get("x-request-id"))
        if self.failures:
            if self.pushback_ms is not None:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", str(self.pushback_ms)),))
            context.abort(self.failures.pop(0), "scripted failure")
        return pb.GenerateResponse(request_id=self.ids[-1], token_ids=[1, 2, 3])

    def GenerateStream(self, request, context):
        self.calls += 1
        self.ids.append(dict(context.invocation_metadata()).get("x-request-id"))
        if self.failures and not self.fail_after_first:
            context.abort(self.failures.pop(0), "scripted failure")
        yield pb.GenerateStreamResponse(request_id="s", block=pb.Block(block=0, token_ids=[7]))
        if self.failures:
            context.abort(self.failures.pop(0), "scripted failure")
        yield pb.GenerateStreamResponse(request_id="s", final=pb.GenerateResponse(token_ids=[7]))


@pytest.fixture
def server():
    made = []

    def start(servicer):
        srv = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_DGServeServicer_to_server(servicer, srv)
        port = srv.add_insecure_port("127.0.0.1:0")
        srv.start()
        made.append(srv)
        return f"127.0.0.1:{port}"

    yield start
    for s in made:
        s.stop(0)


class SyncCalls:
    """Each call on a fresh client, so that the same test runs against both clients."""

    def generate(self, target, client_kw=None, **kw):
        with Client(target, **(client_kw or {})) as c:
            return c.generate(**kw)

    def stream(self, target, client_kw=None, **kw):
        with Client(target, **(client_kw or {})) as c:
            return list(c.generate_stream(**kw))

    def health(self, target, client_kw=None, **kw):
        with Client(target, **(client_kw or {})) as c:
            return c.health(**kw)


class AsyncCalls:
    def generate(self, target, client_kw=None, **kw):
        async def go():
            async with AsyncClient(target, **(client_kw or {})) as c:
                return await c.generate(**kw)
        return asyncio.run(go())

    def stream(self, target, client_kw=None, **kw):
        async def go():
            async with AsyncClient(target, **(client_kw or {})) as c:
                return [m async for m in c.generate_stream(**kw)]
        return asyncio.run(go())

    def health(self, target, client_kw=None, **kw):
        async def go():
            async with AsyncClient(target, **(client_kw or {})) as c:
                return await c.health(**kw)
        return asyncio.run(go())


@pytest.fixture(params=["sync", "asyncio"])
def calls(request):
    return SyncCalls() if request.param == "sync" else AsyncCalls()


def test_unavailable_and_resource_exhausted_are_retried_with_the_same_request_id(server, calls):
    s = Scripted([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
    r = calls.generate(server(s), {"backoff_s": 0.01}, token_ids=[1], request_id="same")
    assert list(r.token_ids) == [1, 2, 3] and s.calls == 3 and s.ids == ["same"] * 3


def test_retries_stop_after_the_limit_with_a_typed_error(server, calls):
    s = Scripted([grpc.StatusCode.RESOURCE_EXHAUSTED] * 5)
    with pytest.raises(ResourceExhausted) as e:
        calls.generate(server(s), {"retries": 2, "backoff_s": 0.01}, token_ids=[1], request_id="r1")
    assert s.calls == 3 and e.value.retriable and e.value.request_id == "r1"


def test_resource_exhausted_waits_at_least_the_servers_retry_hint(server, calls):
    s = Scripted([grpc.StatusCode.RESOURCE_EXHAUSTED] * 2, pushback_ms=400)
    r = calls.generate(server(s), {"backoff_s": 0.01}, token_ids=[1])
    assert list(r.token_ids) == [1, 2, 3] and s.calls == 3
    gaps = [b - a for a, b in zip(s.times, s.times[1:], strict=False)]
    assert min(gaps) >= 0.4, gaps  # the backoff alone would be 5-20 ms
    s = Scripted([grpc.StatusCode.RESOURCE_EXHAUSTED] * 3, pushback_ms=50)
    with pytest.raises(ResourceExhausted) as e:
        calls.generate(server(s), {"retries": 1, "backoff_s": 0.01}, token_ids=[1])
    assert e.value.retry_after_s == 0.05


def test_a_request_that_can_never_fit_is_not_retried(server, calls):
    s = Scripted([grpc.StatusCode.OUT_OF_RANGE])
    with pytest.raises(OutOfRange) as e:
        calls.generate(server(s), {"backoff_s": 0.01}, token_ids=[1])
    assert s.calls == 1 and not e.value.retriable


def test_invalid_argument_is_not_retried(server, calls):
    s = Scripted([grpc.StatusCode.INVALID_ARGUMENT])
    with pytest.raises(InvalidArgument):
        calls.generate(server(s), {"backoff_s": 0.01}, token_ids=[1])
    assert s.calls == 1


def test_a_stream_is_retried_before_its_first_message(server, calls):
    s = Scripted([grpc.StatusCode.UNAVAILABLE])
    msgs = calls.stream(server(s), {"backoff_s": 0.01}, token_ids=[1], request_id="st")
    assert [m.WhichOneof("event") for m in msgs] == ["block", "final"] and s.calls == 2 and s.ids == ["st"] * 2


def test_a_stream_is_not_retried_after_its_first_message(server, calls):
    s = Scripted([grpc.StatusCode.UNAVAILABLE], fail_after_first=True)
    with pytest.raises(Unavailable) as e:
        calls.stream(server(s), {"backoff_s": 0.01}, token_ids=[1], request_id="once")
    assert s.calls == 1 and e.value.request_id == "once"


def test_the_deadline_bounds_the_retries(server, calls):
    s = Scripted([grpc.StatusCode.UNAVAILABLE] * 100)
    t0 = time.monotonic()
    with pytest.raises(Unavailable):
        calls.generate(server(s), {"retries": 100, "backoff_s": 0.05, "backoff_cap_s": 0.1}, token_ids=[1],
                       timeout=1.0)
    assert time.monotonic() - t0 < 3


def test_a_server_of_another_api_major_version_is_refused(server, calls):
    s = Scripted([], api="2.1")
    with pytest.raises(ApiVersionMismatch, match="'2.1'; this client speaks 1.x") as e:
        calls.generate(server(s), token_ids=[1])
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and not e.value.retriable
    assert s.calls == 0  # refused before the request was sent


def test_an_unreachable_server_is_unavailable(calls):
    with pytest.raises(Unavailable):
        calls.health("127.0.0.1:1", {"retries": 1, "backoff_s": 0.01, "timeout": 2}, timeout=0.5)


def test_the_sync_and_asyncio_clients_have_the_same_public_signatures():
    def public(cls):  # the parameters (the return types differ: Iterator or AsyncIterator, Client or AsyncClient)
        return {n: list(inspect.signature(f).parameters.values()) for n, f in inspect.getmembers(cls, callable)
                if not n.startswith("_") or n == "__init__"}

    sync, aio = public(Client), public(AsyncClient)
    assert {"__init__", "generate", "generate_stream", "tokenize", "info", "health", "close"} <= set(sync)
    assert sync == aio


class Limited(Scripted):
    """A server that accepts requests of at most 100 bytes (GetModelInfo says so)."""

    def GetModelInfo(self, request, context):
        return pb.ModelInfo(api_version="1.0", limits=pb.Limits(max_request_bytes=100))


def test_a_request_over_the_servers_size_limit_is_refused_before_it_is_sent(server, calls):
    s = Limited([])
    target = server(s)
    assert list(calls.generate(target, token_ids=[1] * 10).token_ids) == [1, 2, 3]
    with pytest.raises(InvalidArgument, match="max_request_bytes"):
        calls.generate(target, token_ids=list(range(100, 200)))
    with pytest.raises(InvalidArgument, match="max_request_bytes"):
        calls.stream(target, prompt="x" * 500)
    assert s.calls == 1  # the large ones never reached the server


def test_the_servers_too_large_answer_is_not_retried(server, calls):
    """gRPC refuses a message over the receive limit with RESOURCE_EXHAUSTED; sending it again cannot help."""
    s = Scripted([])

    def too_large(request, context):
        s.calls += 1
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (5000 vs. 100)")

    s.Generate = too_large
    with pytest.raises(ResourceExhausted, match="larger than max"):
        calls.generate(server(s), {"backoff_s": 0.01}, token_ids=[1])
    assert s.calls == 1


class Outage(Scripted):
    """UNAVAILABLE for the first `seconds` (a unit or the gateway being rebuilt), then answers."""

    def __init__(self, seconds: float):
        super().__init__([])
        self.until = time.monotonic() + seconds

    def Generate(self, request, context):
        self.calls += 1
        if time.monotonic() < self.until:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the engine unit failed; send the request again")
        return pb.GenerateResponse(token_ids=[1, 2, 3])


def test_retries_outlast_an_outage_within_their_window_and_give_up_after_it(server, calls):
    """The window is counted from the first failure, whatever the number of attempts (equal-jitter backoff)."""
    kw = {"backoff_s": 0.05, "backoff_cap_s": 0.2, "retry_window_s": 2.0}
    assert list(calls.generate(server(Outage(1.0)), kw, token_ids=[1]).token_ids) == [1, 2, 3]
    t0 = time.monotonic()
    with pytest.raises(Unavailable):
        calls.generate(server(Outage(60.0)), kw, token_ids=[1])
    assert 2.0 <= time.monotonic() - t0 < 4.0


def test_the_default_retries_cover_a_rebuild():
    """A unit or gateway rebuild took 9-21 s (issue 11); the defaults keep retrying for longer, and their backoff
    steps (at least half of each, capped) cannot run out of attempts before the window ends."""
    from dgserve_client.calls import backoff

    c = Client("127.0.0.1:1")
    try:
        assert c.retry_window_s >= 30
        shortest = sum(min(c.backoff_cap_s, c.backoff_s * 2 ** a) / 2 for a in range(c.retries))
        assert shortest >= c.retry_window_s
        assert all(0.5 * min(2.0, 0.2 * 2 ** a) <= backoff(a, 0.2, 2.0) <= min(2.0, 0.2 * 2 ** a) for a in range(8))
    finally:
        c.close()
