"""An engine unit is one Ray Serve replica: it admits, cancels and relays events; its rank actors do the work.

The replica is declared with `placement_group_bundles` (bundle 0 is the replica itself, then one bundle per
rank), so Serve reserves the whole unit at once and the rank actors land in the replica's placement group. The
replica never sits in the per-step loop: that runs on rank 0. A dead or hung rank fails the unit's requests
with UNAVAILABLE (retriable), `check_health` reports it, and Serve rebuilds the unit.

`check_health` (Serve's, every `serve.health_check_period_s`): every rank must answer within RANK_TIMEOUT_S and
rank 0's engine must be sound; a rank found dead or silent fails rank 0's engine at once, so its requests end
now instead of at the watchdog. Rank actors are named `dgserve-<unit>-rank<i>` (the gateway's health probe
finds them by name). No orphans: a caller (a gateway replica) that dies with streams open cannot cancel them, so the
unit checks its callers every CALLER_CHECK_S and cancels the calls of one that is gone.
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
RANK_TIMEOUT_S = 2.0  # a rank's status call (a threaded actor method) answers in milliseconds unless it is hung
CALLER_CHECK_S = 1.0
STRATEGY = {"replicated": "PACK", "packed": "STRICT_PACK", "disaggregated": "SPREAD"}


class EngineUnit:
    def __init__(self, topology: dict):
        self.topo = topology_from_dict(topology)
        ctx = serve.get_replica_context()
        self.unit = f"{ctx.app_name}-{ctx.replica_id.unique_id}"
        pg = get_current_placement_group()
        actor = ray.remote(RankActor)
        self.names = [f"dgserve-{self.unit}-rank{i}" for i in range(self.topo.world)]
        self.ranks = []
        for i, name in enumerate(self.names):
            res = self.topo.resources["attention" if i < self.topo.attention_ranks else "experts"]
            opts = {"num_cpus": res.cpus, "num_gpus": res.gpus, "name": name, "max_concurrency": 1000}
            if pg is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i + 1)
            self.ranks.append(actor.options(**opts).remote(i, len(self.names), topology, self.unit))
        address, port = ray.get(self.ranks[0].endpoint.remote())
        self.info = ray.get([r.start.remote(address, port) for r in self.ranks])
        self.callers: dict[tuple[str, str], set[str]] = {}  # (namespace, actor name) -> its calls in flight
        self._watching: asyncio.Task | None = None
        log.info("unit %s ready: %s", self.unit, self.info)

    async def generate(self, request: GenerateRequest, caller: tuple[str, str] | None = None):
        """The request's events (a streaming call): drafts if asked, committed blocks, then Finished or Failed.
        `caller`: the (namespace, name) of the calling actor (a gateway replica), watched while the call runs."""
        if request.request_id is None:
            request = dataclasses.replace(request, request_id=uuid.uuid4().hex)
        call = uuid.uuid4().hex  # this call's own key on rank 0; never request_id, a label any client may reuse
        ended = False
        if caller is not None:
            self._watch(tuple(caller), call)
        try:
            async for ref in self.ranks[0].generate.options(num_returns="streaming").remote(request, call):
                event = await ref
                ended = isinstance(event, Finished | Failed)
                yield event
        except ray.exceptions.TaskCancelledError:
            log.info("unit %s: request %s cancelled by its caller", self.unit, request.request_id)
        except ray.exceptions.RayError as e:
            ended = True
            log.error("unit %s: request %s lost its rank: %s", self.unit, request.request_id, e)
            yield Failed(Code.UNAVAILABLE, f"engine unit {self.unit} failed while serving request "
                                           f"{request.request_id} (a rank died); send the request again")
        finally:
            if caller is not None:
                self._unwatch(tuple(caller), call)
            if not ended:  # the caller went away: free this call's request on rank 0 at its next iteration
                self.ranks[0].cancel.remote(call)

    # -- callers -----------------------------------------------------------------------------------------------
    def _watch(self, caller: tuple[str, str], call: str) -> None:
        self.callers.setdefault(caller, set()).add(call)
        if self._watching is None or self._watching.done():
            self._watching = asyncio.get_running_loop().create_task(self._watch_callers())

    def _unwatch(self, caller: tuple[str, str], call: str) -> None:
        calls = self.callers.get(caller)
        if calls is not None:
            calls.discard(call)
            if not calls:
                del self.callers[caller]

    async def _watch_callers(self) -> None:
        """While calls are in flight: every CALLER_CHECK_S, cancel the calls of a caller that no longer exists."""
        while self.callers:
            await asyncio.sleep(CALLER_CHECK_S)
            for caller in list(self.callers):
                if not await asyncio.to_thread(actor_exists, *caller):
                    calls = self.callers.pop(caller, set())
                    log.warning("unit %s: caller %s is gone; cancelling its %d call(s)", self.unit, caller[1],
                                len(calls))
                    for call in calls:
                        self.ranks[0].cancel.remote(call)

    # -- health ------------------------------------------------------------------------------------------------
    async def _rank_states(self) -> list[dict]:
        """Every rank's status; a rank that is dead or does not answer in RANK_TIMEOUT_S fails the unit now."""
        results = await asyncio.gather(*(asyncio.wait_for(r.status.remote(), RANK_TIMEOUT_S) for r in self.ranks),
                                       return_exceptions=True)
        silent = [f"rank {k}: {type(e).__name__}" for k, e in enumerate(results) if isinstance(e, BaseException)]
        if silent:
            reason = f"unit {self.unit}: a rank is dead or does not answer ({'; '.join(silent)})"
            if not isinstance(results[0], BaseException):
                self.ranks[0].fail.remote(reason)  # its requests end now (UNAVAILABLE), not at the watchdog
            raise RuntimeError(reason)
        bad = [s for s in results if not s.get("healthy", False)]
        if bad:
            raise RuntimeError(f"unit {self.unit} is unhealthy: {bad}")
        return results

    async def status(self) -> dict:
        states = await asyncio.gather(*(r.status.remote() for r in self.ranks))
        return {"unit": self.unit, "ranks": list(states), "names": self.names, "started": self.info}

    async def reset_step_stats(self) -> None:
        await self.ranks[0].reset_step_stats.remote()

    async def check_health(self) -> None:
        await self._rank_states()

    def __del__(self):
        for r in getattr(self, "ranks", []):
            with contextlib.suppress(Exception):  # already gone
                ray.kill(r)


def actor_exists(namespace: str, name: str) -> bool:
    """Whether a named actor is alive (the name of a dead one is released)."""
    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    return True


def check_expert_map(topo: Topology) -> None:
    """An explicit expert map must name each of the checkpoint's experts exactly once: checked before deploying,
    so a wrong map is a clear error here instead of units that fail to start."""
    if topo.expert_map is None:
        return
    from dgserve.model.config import load_model_config
    from dgserve.model.hub import TOKENIZER_PATTERNS, default_model_dir, resolve_checkpoint

    from .experts.partition import ExpertPartition

    folder = resolve_checkpoint(topo.model or default_model_dir(), topo.revision, patterns=TOKENIZER_PATTERNS)
    ExpertPartition.explicit(load_model_config(folder).text.num_experts, topo.expert_map)


def unit_deployment(topo: Topology):
    """The Serve deployment of an engine unit, sized from the topology."""
    check_expert_map(topo)
    roles = ["attention"] * topo.attention_ranks + ["experts"] * topo.expert_ranks
    bundles = [{"CPU": topo.resources[r].cpus} | ({"GPU": topo.resources[r].gpus} if topo.resources[r].gpus else {})
               for r in roles]
    opts = {
        "name": "EngineUnit",
        "ray_actor_options": {"num_cpus": REPLICA_CPUS},
        "placement_group_bundles": [{"CPU": REPLICA_CPUS}] + bundles,
        "placement_group_strategy": STRATEGY[topo.profile],
        "max_ongoing_requests": topo.max_ongoing,
        "max_queued_requests": topo.max_queued_requests,  # per caller; beyond it Serve refuses (BackPressureError)
        "graceful_shutdown_timeout_s": topo.graceful_shutdown_s,
        "graceful_shutdown_wait_loop_s": 1.0,
        "health_check_period_s": topo.serve.health_check_period_s,
        "health_check_timeout_s": topo.serve.health_check_timeout_s,
    }
    if any(topo.node_labels[r] for r in set(roles)):
        opts["placement_group_bundle_label_selector"] = [{}] + [dict(topo.node_labels[r]) for r in roles]
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
