"""A real endpoint (gateway + one engine unit on the session's local Ray cluster) on a free loopback port."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dgserve.cluster.api import free_port


def health(address: str) -> str | None:
    with grpc.insecure_channel(address) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


MEDIA = 1 << 20  # the endpoint's room for a request's images (the default is 32 MiB)


@pytest.fixture(scope="package")  # shared by test_gateway.py and test_fuzz.py: deploying costs ~30 s
def endpoint(ray_cluster, tiny_dir):
    """(address, statuses seen from the first answer until SERVING, topology)."""
    from ray import serve

    from dgserve.cluster.config import parse_topology
    from dgserve.cluster.gateway.deployment import gateway_app, route_prefix

    port = free_port()
    topo = parse_topology({"name": "gw", "model": str(tiny_dir), "gateway": {"port": port, "max_prompt_tokens": 512,
                                                                            "grace_s": 2, "max_media_bytes": MEDIA},
                           "http": {"port": ray_cluster.test_http_port, "served_model_name": "tiny"}})
    import threading

    deploying = threading.Thread(target=serve.run, args=(gateway_app(topo),),
                                 kwargs={"name": "gw", "route_prefix": route_prefix(topo)}, daemon=True)
    deploying.start()  # watch the health from the first answer, while the units load
    address, seen, t0 = f"127.0.0.1:{port}", [], time.monotonic()
    while time.monotonic() - t0 < 120:
        s = health(address)
        if s is not None:
            seen.append(s)
            if s == "SERVING":
                break
        time.sleep(0.05)
    assert seen and seen[-1] == "SERVING", seen
    deploying.join(60)
    yield address, seen, topo
    serve.delete("gw")


@pytest.fixture(scope="package")
def http_base(endpoint, ray_cluster) -> str:
    """The endpoint's OpenAI-compatible API on the session's Serve HTTP proxy (model "tiny")."""
    return f"http://127.0.0.1:{ray_cluster.test_http_port}/v1"
