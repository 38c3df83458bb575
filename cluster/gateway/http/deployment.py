"""The HTTP API as a Serve ingress deployment: Serve's HTTP proxy routes `{http.route_prefix}*` to it; it reaches
the engine units through the same DeploymentHandle as the gRPC gateway and asks the gateway whether the endpoint
can serve (its health follows the gateway's probe)."""

from __future__ import annotations

import asyncio
import logging

from ray import serve

from ...config import actor_options, topology_from_dict
from ..front import load_front
from ..security import ApiKeys
from .app import make_app
from .service import OpenAIService

log = logging.getLogger("dgserve.http")
INGRESS_CPUS = 0.25


@serve.ingress()
class OpenAIIngress:
    async def __init__(self, unit, gateway, topology: dict):
        from ..deployment import own_name

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.topo = topology_from_dict(topology)
        g = self.topo.gateway
        self.gateway = gateway
        self.service = OpenAIService(load_front(self.topo), unit, own_name(), self._gateway_serving)
        self._app = make_app(self.service, ApiKeys(g.api_keys_file, g.api_keys_env) if g.auth else None)
        log.info("HTTP API ready: model %r under %s", self.service.model_id, self.topo.http.route_prefix)
        if g.drain_file:  # a pod's preStop hook asks for a drain through this file (the gateway's too)
            from ...drain import watch

            self._drain_watch = asyncio.create_task(watch(g.drain_file, self.drain, "http"))

    def __serve_build_asgi_app__(self):
        return self._app

    async def _gateway_serving(self) -> tuple[bool, str]:
        try:
            status = await asyncio.wait_for(self.gateway.status.remote(), timeout=5)
        except Exception as e:  # the gateway replica is gone or stuck: nothing says the endpoint serves
            return False, f"the gateway did not answer ({type(e).__name__})"
        # Whether units can serve, from whichever gateway answered. Not whether that gateway drains: with several
        # gateway pods, one pod's drain says nothing of this ingress (which drains through its own drain file).
        return bool(status["serving"]), status["why"]

    async def drain(self, grace_s: float | None = None) -> dict:
        grace = self.topo.gateway.grace_s if grace_s is None else grace_s
        left = await self.service.drain(grace)
        log.info("HTTP API drained: %d request(s) ended after %.1fs", len(left), grace)
        return {"failed": left}


def http_app(topo, units, gateway):
    """The ingress bound to the units and the gateway (which keeps serving gRPC beside it)."""
    return serve.deployment(OpenAIIngress).options(
        name="OpenAI", ray_actor_options=actor_options(INGRESS_CPUS, topo.http.ray_resources),
        num_replicas=topo.http.replicas, max_ongoing_requests=1000,
        graceful_shutdown_timeout_s=topo.gateway.grace_s + 5,
        health_check_period_s=topo.serve.health_check_period_s).bind(units, gateway, topo.to_dict())
