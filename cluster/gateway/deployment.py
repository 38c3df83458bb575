"""The gateway as a Serve deployment (one replica per node): it runs the gRPC server and reaches the engine
units through a DeploymentHandle.

Health tells the truth: NOT_SERVING until a warm-up request went through a unit; from then on SERVING exactly while
the probe (probe.py, every `gateway.probe_period_s`) finds a unit that can serve. A dead, hung or rebuilding unit
turns it NOT_SERVING within about a second; a busy one does not."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import ray
from ray import serve

from ..config import Topology, actor_options, topology_from_dict
from ..engine.events import Finished
from ..messages import GenerateRequest
from ..units import unit_deployment
from .convert import model_info
from .front import load_front
from .probe import UnitProbe, Verdict
from .server import set_serving, start_server
from .service import DGServeService
from .text import TextWorker

log = logging.getLogger("dgserve.gateway")

SERVER_VERSION = "0.1.0"
GATEWAY_CPUS = 0.5


class Gateway:
    async def __init__(self, unit, topology: dict):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.topo = topology_from_dict(topology)
        self.unit = unit
        front = load_front(self.topo)
        self.tokenizer, self.config, self.defaults, self.limits = front.tokenizer, front.config, front.defaults, \
            front.limits
        self.pad = front.pad
        self.media = front.media  # the image processor (transformers: imported on the first image)
        self.info = model_info(self.topo, self.config, self.defaults, self.limits, front.model_id, SERVER_VERSION,
                               front.media)
        self.inflight: Counter[str] = Counter()  # request ids are labels: two calls may share one
        self.caller = own_name()  # who calls the units: they cancel our calls if this actor dies
        app = serve.get_replica_context().app_name
        self.probe = UnitProbe(app, self.topo.world)
        self.last_verdict: Verdict | None = None
        self.text = TextWorker()
        self.draining, self.hard_stop, self.serving = False, asyncio.Event(), False
        self.server, self.health, self.port = await start_server(DGServeService(self), self.topo.gateway,
                                                                 self.limits.max_request_bytes)
        log.info("gateway listening on %s:%d (NOT_SERVING until warm)", self.topo.gateway.host, self.port)
        self._warm = asyncio.create_task(self._watch_units())
        if self.topo.gateway.drain_file:  # a pod's preStop hook asks for a drain through this file
            from ..drain import watch

            self._drain_watch = asyncio.create_task(watch(self.topo.gateway.drain_file, self.drain))

    async def _watch_units(self) -> None:
        """Warm up, then keep health equal to the probe's verdict until the gateway drains."""
        await self._warm_up()
        period = self.topo.gateway.probe_period_s
        while not self.draining:
            try:
                verdict = await self.probe.check()
            except Exception as e:  # the GCS did not answer: nothing is known to serve
                verdict = Verdict(False, f"probe failed: {type(e).__name__}: {e}")
            await self._set_serving(verdict)
            await asyncio.sleep(period)

    async def _set_serving(self, verdict: Verdict) -> None:
        if self.draining:
            return
        if verdict.serving != self.serving:
            log.warning("gateway health: %s (%s)", "SERVING" if verdict.serving else "NOT_SERVING", verdict.why)
            self.serving = verdict.serving
            await set_serving(self.health, verdict.serving)
        self.last_verdict = verdict

    async def _warm_up(self) -> None:
        """One tiny request through a unit, retried until it works; then health says SERVING."""
        bos = self.config.text.bos_token_id if self.config.text.bos_token_id is not None else 2
        req = GenerateRequest((bos,), 0, {"max_new_tokens": 1, "max_denoising_steps": 1})
        t0 = time.monotonic()
        while not self.draining:
            last = None
            try:
                async for event in self.unit.options(stream=True).generate.remote(req):
                    last = event
            except Exception as e:  # units still starting
                log.info("gateway warm-up: %s", e)
            if isinstance(last, Finished):
                break
            await asyncio.sleep(0.5)
        if not self.draining:
            await self._set_serving(Verdict(True, "warm-up request served"))
            log.info("gateway SERVING after %.1fs warm-up", time.monotonic() - t0)

    async def address(self) -> str:
        return f"{self.topo.gateway.host}:{self.port}"

    async def status(self) -> dict:
        return {"serving": self.serving, "draining": self.draining, "inflight": sorted(self.inflight.elements()),
                "port": self.port, "why": self.last_verdict.why if self.last_verdict else "warming up"}

    async def check_health(self) -> None:
        if self.draining:
            return
        if self._warm.done() and self._warm.exception() is not None:
            raise RuntimeError(f"gateway warm-up failed: {self._warm.exception()}")

    async def drain(self, grace_s: float | None = None) -> dict:
        """Stop accepting (health NOT_SERVING, new calls UNAVAILABLE), let in-flight requests finish within the
        grace period, fail the rest with UNAVAILABLE, stop the server."""
        if not hasattr(self, "server"):  # __init__ failed before the server started: nothing to drain
            return {"failed": []}
        grace = self.topo.gateway.grace_s if grace_s is None else grace_s
        if not self.draining:
            self.draining = True
            await set_serving(self.health, False)
            t0 = time.monotonic()
            while self.inflight and time.monotonic() - t0 < grace:
                await asyncio.sleep(0.05)
            left = sorted(self.inflight.elements())
            self.hard_stop.set()
            await asyncio.sleep(0.2)  # let the aborts reach their clients
            await self.server.stop(1.0)
            self.text.close()
            log.info("gateway drained: %d request(s) failed with UNAVAILABLE after %.1fs", len(left), grace)
            return {"failed": left}
        return {"failed": []}

    async def __del__(self):
        await self.drain()


def own_name() -> tuple[str, str] | None:
    """(namespace, name) of this actor, as `ray.get_actor` finds it. A Serve replica's actor lives in Serve's
    namespace, not in the job's namespace that the runtime context reports, so it is looked up by name."""
    name = ray.get_runtime_context().get_actor_name()
    for entry in ray.util.list_named_actors(all_namespaces=True) if name else ():
        if entry["name"] == name:
            return entry["namespace"], name
    return None


def gateway_app(topo: Topology):
    """The whole endpoint: the gRPC gateway bound to the engine units; with `http.enabled`, the HTTP API's ingress
    is the application's ingress, bound to the same units and to the gateway. `route_prefix(topo)` is where
    Serve's HTTP proxy mounts it."""
    units = unit_deployment(topo).bind(topo.to_dict())
    gw = serve.deployment(Gateway).options(
        name="Gateway", ray_actor_options=actor_options(GATEWAY_CPUS, topo.gateway.ray_resources),
        max_replicas_per_node=1, num_replicas=topo.gateway.replicas,
        max_ongoing_requests=100, graceful_shutdown_timeout_s=topo.gateway.grace_s + 5,
        health_check_period_s=topo.serve.health_check_period_s).bind(units, topo.to_dict())
    if not topo.http.enabled:
        return gw
    from .http.deployment import http_app

    return http_app(topo, units, gw)


def route_prefix(topo: Topology) -> str | None:
    return topo.http.route_prefix if topo.http.enabled else None
