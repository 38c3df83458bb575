"""Faults on the real endpoint: health tells the truth while no unit can serve, and a gateway that dies with a
stream open leaves no orphan on the unit. Each test leaves the endpoint SERVING again for the next."""

from __future__ import annotations

import time

import grpc
import ray

from dgserve_client import Client
from dgserve_client.v1 import dgserve_pb2 as pb
from dgserve_client.v1 import dgserve_pb2_grpc as pb_grpc

from .conftest import health

LONG = pb.SamplerParams(max_new_tokens=32 * 40, max_denoising_steps=48)


def unit_status(topo) -> dict:
    from ray import serve

    return serve.get_deployment_handle("EngineUnit", topo.name).status.remote().result()


def wait_health(address: str, want: str, timeout: float) -> float:
    """Seconds until health says `want`; fails after `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if health(address) == want:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"health did not become {want} within {timeout}s (it is {health(address)})")


def serve_actor(app: str, deployment: str):
    """The Serve replica actor of `deployment` in app `app` (one replica)."""
    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{app}#{deployment}#" in a["name"]]
    assert len(named) == 1, named
    return ray.get_actor(named[0]["name"], namespace=named[0]["namespace"])


def test_health_is_not_serving_while_no_unit_can_serve_and_serving_once_rebuilt(endpoint, capsys):
    address, _, topo = endpoint
    assert health(address) == "SERVING"
    rank0 = unit_status(topo)["names"][0]
    ray.kill(ray.get_actor(rank0))
    down = wait_health(address, "NOT_SERVING", 10)
    up = wait_health(address, "SERVING", 90)
    with capsys.disabled():
        print(f"\nrank 0 killed: health NOT_SERVING after {down:.2f}s, SERVING again {up:.1f}s later")
    assert down < 3, down  # the probe runs every second; a dead actor answers at once
    with Client(address, retries=0) as c:  # SERVING means it serves
        assert len(c.generate(token_ids=[5, 6], max_new_tokens=32, max_denoising_steps=2).token_ids) == 32
    assert rank0 not in unit_status(topo)["names"]


def test_a_gateway_that_dies_with_a_stream_open_leaves_no_orphan(endpoint, capsys):
    address, _, topo = endpoint
    with grpc.insecure_channel(address) as ch:
        call = pb_grpc.DGServeStub(ch).GenerateStream(
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), stream_drafts=True, sampler=LONG),
            metadata=(("x-request-id", "orphan"),))
        assert next(call).HasField("draft")
        time.sleep(2.5)  # the unit checks its callers every second: a live gateway's call is left alone
        assert "orphan" in unit_status(topo)["ranks"][0]["request_ids"]
        ray.kill(serve_actor(topo.name, "Gateway"))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 15:
            st = unit_status(topo)["ranks"][0]
            if "orphan" not in st["request_ids"]:
                break
            time.sleep(0.1)
        freed = time.monotonic() - t0
        call.cancel()
    assert "orphan" not in st["request_ids"] and not st["slots"] and st["request_bytes"] == 0
    assert st["errors"].get("CANCELLED", 0) >= 1
    up = wait_health(address, "SERVING", 90)
    with capsys.disabled():
        print(f"\ngateway killed mid-stream: the unit freed the request after {freed:.2f}s; a new gateway was "
              f"SERVING {up:.1f}s later")
    assert freed < 4, freed  # the unit checks its callers every second; the request ends at the next iteration
    with Client(address) as c:  # the client's retry, with the same request id, is served
        r = c.generate(token_ids=[5, 6, 7], max_new_tokens=32, max_denoising_steps=2, request_id="orphan")
        assert len(r.token_ids) == 32 and r.request_id == "orphan"
