"""An engine unit is one Ray Serve replica: it admits, cancels and relays events; its rank actors do the work.

The replica is declared with `placement_group_bundles` (bundle 0 is the replica itself, then one bundle per
rank), so Serve reserves the whole unit at once and the rank actors land in the replica's placement group. The
replica never sits in the per-step loop: that runs on rank 0. A dead or hung rank fails the unit's requests
with UNAVAILABLE (retriable), `check_health` reports it, and Serve rebuilds the unit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid

import ray
from ray import serve
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .config import Topology, topology_from_dict
from .engine.errors import Code
from .engine.events import Failed, Finished
from .messages import GenerateRequest
from .ranks import RankActor

log = logging.getLogger("dgserve.units")

REPLICA_CPUS = 0.1  # the replica only relays; its rank actors hold the model
PING_TIMEOUT_S = 5.0
STRATEGY = {"replicated": "PACK", "packed": "STRICT_PACK", "disaggregated": "SPREAD"}


class EngineUnit:
    def __init__(self, topology: dict):
        self.topo = topology_from_dict(topology)
        ctx = serve.get_replica_context()
        self.unit = f"{ctx.app_name}-{ctx.replica_id.unique_id}"
        pg = get_current_placement_group()
        res = self.topo.resources["attention"]
        actor = ray.remote(RankActor)
        self.names = [f"dgserve-{self.unit}-rank{i}" for i in range(self.topo.attention_ranks)]
        self.ranks = []
        for i, name in enumerate(self.names):
            opts = {"num_cpus": res.cpus, "num_gpus": res.gpus, "name": name, "max_concurrency": 1000}
            if pg is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i + 1)
            self.ranks.append(actor.options(**opts).remote(i, len(self.names), topology, self.unit))
        address, port = ray.get(self.ranks[0].endpoint.remote())
        self.info = ray.get([r.start.remote(address, port) for r in self.ranks])
        log.info("unit %s ready: %s", self.unit, self.info)

    async def generate(self, request: GenerateRequest):
        """The request's events (a streaming call): drafts if asked, committed blocks, then Finished or Failed."""
        if request.request_id is None:
            request = dataclasses.replace(request, request_id=uuid.uuid4().hex)
        call = uuid.uuid4().hex  # this call's own key on rank 0; never request_id, a label any client may reuse
        ended = False
        try:
            async for ref in self.ranks[0].generate.options(num_returns="streaming").remote(request, call):
                event = await ref
                ended = isinstance(event, Finished | Failed)
                yield event
        except ray.exceptions.RayError as e:
            ended = True
            log.error("unit %s: request %s lost its rank: %s", self.unit, request.request_id, e)
            yield Failed(Code.UNAVAILABLE, f"engine unit {self.unit} failed while serving request "
                                           f"{request.request_id} (a rank died); send the request again")
        finally:
            if not ended:  # the caller went away: free this call's request on rank 0 at its next iteration
                self.ranks[0].cancel.remote(call)

    async def status(self) -> dict:
        states = await asyncio.gather(*(r.status.remote() for r in self.ranks))
        return {"unit": self.unit, "ranks": list(states), "names": self.names}

    async def reset_step_stats(self) -> None:
        await self.ranks[0].reset_step_stats.remote()

    async def check_health(self) -> None:
        try:
            states = await asyncio.wait_for(asyncio.gather(*(r.status.remote() for r in self.ranks)),
                                            PING_TIMEOUT_S)
        except Exception as e:
            raise RuntimeError(f"unit {self.unit}: a rank does not answer ({type(e).__name__}: {e})") from e
        bad = [s for s in states if not s.get("healthy", False)]
        if bad:
            raise RuntimeError(f"unit {self.unit} is unhealthy: {bad}")

    def __del__(self):
        for r in getattr(self, "ranks", []):
            with contextlib.suppress(Exception):  # already gone
                ray.kill(r)


def unit_deployment(topo: Topology):
    """The Serve deployment of an engine unit, sized from the topology."""
    res, labels = topo.resources["attention"], topo.node_labels["attention"]
    bundle = {"CPU": res.cpus} | ({"GPU": res.gpus} if res.gpus else {})
    opts = {
        "name": "EngineUnit",
        "ray_actor_options": {"num_cpus": REPLICA_CPUS},
        "placement_group_bundles": [{"CPU": REPLICA_CPUS}] + [bundle] * topo.attention_ranks,
        "placement_group_strategy": STRATEGY[topo.profile],
        "max_ongoing_requests": topo.max_ongoing,
        "graceful_shutdown_timeout_s": topo.graceful_shutdown_s,
        "graceful_shutdown_wait_loop_s": 1.0,
        "health_check_period_s": topo.serve.health_check_period_s,
        "health_check_timeout_s": topo.serve.health_check_timeout_s,
    }
    if labels:
        opts["placement_group_bundle_label_selector"] = [{}] + [dict(labels)] * topo.attention_ranks
    u, s = topo.units, topo.serve
    if u.max > u.min:
        opts["autoscaling_config"] = {
            "min_replicas": u.min, "max_replicas": u.max, "initial_replicas": u.initial,
            "target_ongoing_requests": s.target_ongoing_requests or float(topo.running_capacity),
            "upscale_delay_s": s.upscale_delay_s, "downscale_delay_s": s.downscale_delay_s,
            "look_back_period_s": s.look_back_period_s,
        }
    else:
        opts["num_replicas"] = u.min
    return serve.deployment(EngineUnit).options(**opts)


def unit_app(topo: Topology):
    return unit_deployment(topo).bind(topo.to_dict())
