"""The HTTP API's real FastAPI app and service on a real uvicorn server on loopback, in front of a stand-in engine
unit (tests/cluster/gateway/test_gateway.StandInUnit): what the app does with bodies, errors, keys and streams,
without a Ray cluster."""

from __future__ import annotations

import contextlib
import threading
import time

import uvicorn

from dgserve.cluster.api import free_port


@contextlib.contextmanager
def serve_http(tiny_dir, unit, keys=None, serving=None, **topology):
    """Yields (base URL ending in /v1, the OpenAIService)."""
    from dgserve.cluster.config import parse_topology
    from dgserve.cluster.gateway.front import load_front
    from dgserve.cluster.gateway.http.app import make_app
    from dgserve.cluster.gateway.http.service import OpenAIService

    raw = {"model": str(tiny_dir), "http": {"served_model_name": "tiny"}, **topology}
    raw["gateway"] = {"max_prompt_tokens": 512, **raw.get("gateway", {})}
    service = OpenAIService(load_front(parse_topology(raw)), unit, serving=serving)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(service, keys), host="127.0.0.1", port=port, lifespan="off",
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started and time.monotonic() - t0 < 30:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}/v1", service
    finally:
        server.should_exit = True
        thread.join(10)
        service.text.close()
