"""Client retries, backoff, deadlines and typed errors against a scripted in-process gRPC server."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import pytest

from dgserve_client import Client, InvalidArgument, ResourceExhausted, Unavailable
from dgserve_client.v1 import dgserve_pb2 as pb
from dgserve_client.v1 import dgserve_pb2_grpc as pb_grpc


class Scripted(pb_grpc.DGServeServicer):
    """Fails the first calls with the given codes, then answers."""

    def __init__(self, failures: list[grpc.StatusCode], api: str = "1.0"):
        self.failures, self.api, self.calls, self.ids = list(failures), api, 0, []

    def GetModelInfo(self, request, context):
        return pb.ModelInfo(api_version=self.api)

    def Generate(self, request, context):
        self.calls += 1
        self.ids.append(dict(context.invocation_metadata()).get("x-request-id"))
        if self.failures:
            context.abort(self.failures.pop(0), "scripted failure")
        return pb.GenerateResponse(request_id=self.ids[-1], token_ids=[1, 2, 3])

    def GenerateStream(self, request, context):
        self.calls += 1
        if self.failures:
            context.abort(self.failures.pop(0), "scripted failure")
        yield pb.GenerateStreamResponse(request_id="s", block=pb.Block(block=0, token_ids=[7]))
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


def test_unavailable_and_resource_exhausted_are_retried_with_the_same_request_id(server):
    s = Scripted([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
    with Client(server(s), backoff_s=0.01) as c:
        r = c.generate(token_ids=[1], request_id="same")
    assert list(r.token_ids) == [1, 2, 3] and s.calls == 3 and s.ids == ["same"] * 3


def test_retries_stop_after_the_limit_with_a_typed_error(server):
    s = Scripted([grpc.StatusCode.RESOURCE_EXHAUSTED] * 5)
    with Client(server(s), retries=2, backoff_s=0.01) as c, pytest.raises(ResourceExhausted) as e:
        c.generate(token_ids=[1], request_id="r1")
    assert s.calls == 3 and e.value.retriable and e.value.request_id == "r1"


def test_invalid_argument_is_not_retried(server):
    s = Scripted([grpc.StatusCode.INVALID_ARGUMENT])
    with Client(server(s), backoff_s=0.01) as c, pytest.raises(InvalidArgument):
        c.generate(token_ids=[1])
    assert s.calls == 1


def test_a_stream_is_retried_before_its_first_message(server):
    s = Scripted([grpc.StatusCode.UNAVAILABLE])
    with Client(server(s), backoff_s=0.01) as c:
        msgs = list(c.generate_stream(token_ids=[1]))
    assert [m.WhichOneof("event") for m in msgs] == ["block", "final"] and s.calls == 2


def test_the_deadline_bounds_the_retries(server):
    s = Scripted([grpc.StatusCode.UNAVAILABLE] * 100)
    t0 = time.monotonic()
    with Client(server(s), retries=100, backoff_s=0.05, backoff_cap_s=0.1) as c, pytest.raises(Unavailable):
        c.generate(token_ids=[1], timeout=1.0)
    assert time.monotonic() - t0 < 3


def test_a_server_of_another_api_major_version_is_refused(server):
    with Client(server(Scripted([], api="2.1"))) as c, pytest.raises(Exception, match="speaks 1.x"):
        c.generate(token_ids=[1])


def test_an_unreachable_server_is_unavailable():
    with Client("127.0.0.1:1", retries=1, backoff_s=0.01, timeout=2) as c, pytest.raises(Unavailable):
        c.health(timeout=0.5)
