"""Rank actors: the processes of an engine unit. Rank 0 runs the driver loop; every rank runs an executor.

They are Ray actors created by the unit's Serve replica inside the replica's placement group (one bundle per
rank) and form one torch.distributed group (gloo on CPU; nccl on GPU plus a gloo group for control messages).
Rank 0 relays each request's events back to the replica as a Ray streaming generator: one Ray call per request,
never one per step.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from datetime import timedelta

from .config import topology_from_dict
from .engine.events import Finished, RequestStream

log = logging.getLogger("dgserve.ranks")

GROUP_TIMEOUT = timedelta(hours=1)  # idle ranks are kept alive by heartbeats; hangs are the watchdog's
EARLY_CANCELS = 4096  # cancelled calls remembered until they start (an async actor may start tasks out of order)


def exchange_group():
    """The group the expert exchange's rows go over: the unit's default group (nccl on GPU, device tensors; gloo on
    CPU). Plans, outcomes and progress go over the gloo control group."""
    import torch.distributed as dist

    return dist.group.WORLD


class RankActor:
    def __init__(self, rank: int, world: int, topology: dict, unit: str):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.rank, self.world, self.unit = rank, world, unit
        self.topo = topology_from_dict(topology)
        self.engine = None
        self.metrics = None
        self.local = None
        self._stopped = threading.Event()
        self._follower: threading.Thread | None = None
        self._calls: dict[str, RequestStream] = {}  # rank 0: the unit's key of each running call -> its stream
        self._early: OrderedDict[str, None] = OrderedDict()  # keys cancelled before their call started
        self.all_to_all: list[dict] = []  # rank 0: the start-up all-to-all sweep (with expert ranks)
        self.fit: str | None = None  # on CUDA: the start-up check's verdict

    # -- set-up ----------------------------------------------------------------------------------------------
    _store_socket: socket.socket | None = None  # rank 0: the TCP store's listening socket, from endpoint to start

    def endpoint(self) -> tuple[str, int]:
        """Rank 0: the group's rendezvous address and port, on this node's Ray address only (127.0.0.1 on a local
        cluster). The socket is bound here and handed to the TCP store in `start`: torch's TCPStore would bind every
        interface itself, and a port only looked up here could be taken before `start`."""
        import ray

        address = ray.util.get_node_ip_address()
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self._store_socket = socket.create_server((address, 0), family=family, backlog=128)
        return address, self._store_socket.getsockname()[1]

    def start(self, address: str, port: int) -> dict:
        import torch.distributed as dist  # here, not at import: the unit's replica never needs torch

        t0 = time.perf_counter()
        backend = "nccl" if self.topo.device == "cuda" else "gloo"
        if self._store_socket is not None:  # rank 0 serves the store on the socket of `endpoint`
            store = dist.TCPStore(address, port, self.world, is_master=True, timeout=GROUP_TIMEOUT,
                                  master_listen_fd=self._store_socket.detach())
            self._store_socket = None
        else:
            store = dist.TCPStore(address, port, self.world, is_master=False, timeout=GROUP_TIMEOUT)
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world, timeout=GROUP_TIMEOUT)
        control = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT) if backend == "nccl" else dist.group.WORLD
        if self.topo.expert_ranks:  # what the exchange can carry here: measured once, reported in the metrics
            import torch

            from .experts.selftest import STARTUP_SIZES, sweep

            self.all_to_all = sweep(list(STARTUP_SIZES), device=torch.device("cuda") if backend == "nccl" else None)
            if self.rank == 0:
                log.info("all-to-all self-test (%s, %d ranks): %s", backend, self.topo.world, ", ".join(
                    f"{r['bytes']} B {r['busbw_gbs']:.2f} GB/s" for r in self.all_to_all))
        if self.rank >= self.topo.attention_ranks:
            folder = self._start_expert_rank(control, store)
        else:
            folder = self._start_attention_rank(control, store)
        import ray

        return {"rank": self.rank, "pid": os.getpid(), "backend": backend, "load_s": time.perf_counter() - t0,
                "model": str(folder), "role": "experts" if self.rank >= self.topo.attention_ranks else "attention",
                "node": ray.get_runtime_context().get_node_id()}

    def _partition(self):
        from dgserve.model.config import load_model_config
        from dgserve.model.hub import default_model_dir, resolve_checkpoint

        from .experts.exchange import Roles
        from .experts.partition import ExpertPartition

        folder = resolve_checkpoint(self.topo.model or default_model_dir(), self.topo.revision)
        roles = Roles(self.topo.attention_ranks, self.topo.expert_ranks)
        num_experts = load_model_config(folder).text.num_experts
        if not roles.experts:
            part = None
        elif self.topo.expert_map is not None:
            part = ExpertPartition.explicit(num_experts, self.topo.expert_map)
        else:
            part = ExpertPartition.balanced(num_experts, roles.experts)
        return folder, roles, part

    def _start_attention_rank(self, control, store):
        import torch

        from dgserve.model.loader import load_checkpoint

        from .engine.executor import Executor
        from .experts.exchange import AllToAllExperts

        folder, roles, part = self._partition()
        self._check_device(folder, experts=[] if part is not None else None)
        ck = load_checkpoint(folder, dtype=self.topo.weights_dtype, device=self.topo.device,
                             experts=[] if part is not None else None,  # no expert tensor is read here
                             experts_dtype=self.topo.experts_dtype)
        if part is not None:
            ck.model.experts = AllToAllExperts(part, roles, exchange_group())
        self.defaults = ck.generation
        cfg = self.topo.engine
        if ck.model.device.type == "cpu":
            torch.set_num_threads(cfg.cpu_threads)
        page = cfg.page_size or ck.config.canvas_length
        threads = cfg.sampler_threads_for(ck.model.device.type, int(self.topo.resources["attention"].cpus))
        self.local = Executor(ck.model, page, cfg.noise_prefetch, threads, cfg.fused_sampler(ck.model.device.type))
        if self.rank == 0:
            self._start_driver(ck, control, store)
        else:
            from .group import follow

            period = min(1.0, self.topo.watchdog_s / 4)
            self._follower = threading.Thread(target=follow, args=(self.local, control, self.rank, self._stopped,
                                                                   store, period, part is not None),
                                              name=f"dgserve-rank{self.rank}", daemon=True)
            self._follower.start()
        return ck.folder

    def _check_device(self, folder, experts) -> None:
        """On CUDA, before loading: will the weights and a useful budget fit this GPU? Refuses to start with the
        verdict if not (cluster/engine/fit.py); the verdict is in the rank's status either way."""
        if self.topo.device != "cuda":
            return
        import torch

        from dgserve.model.config import load_model_config
        from dgserve.model.loader import parse_dtype

        from .engine.fit import check_device

        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        plan = check_device(load_model_config(folder), parse_dtype(self.topo.weights_dtype), total, self.topo.engine,
                            fused=self.topo.engine.fused_sampler("cuda"), experts=experts,
                            experts_dtype=self.topo.experts_dtype)
        self.fit = plan.verdict()
        log.info("rank %d: %s", self.rank, self.fit)

    def _start_expert_rank(self, control, store):
        """An expert rank: only its experts' weights; no KV cache, embeddings or sampler."""
        import torch

        from dgserve.model.loader import load_expert_shard, parse_dtype

        from .experts.exchange import ExpertServer
        from .group import follow_experts

        folder, roles, part = self._partition()
        shard = load_expert_shard(folder, part.experts_of(self.rank - roles.attention), self.topo.weights_dtype,
                                  device=self.topo.device, experts_dtype=self.topo.experts_dtype)
        if self.topo.device == "cpu":
            torch.set_num_threads(self.topo.engine.cpu_threads)
        self.shard = shard
        text = shard.config.text
        period = min(1.0, self.topo.watchdog_s / 4)
        server = ExpertServer(shard.layers, roles, exchange_group(), text.top_k_experts)
        self._follower = threading.Thread(
            target=follow_experts, args=(server, control, self.rank, self._stopped, text.num_layers, text.hidden_size,
                                         parse_dtype(self.topo.weights_dtype), store, period),
            name=f"dgserve-experts{self.rank}", daemon=True)
        self._follower.start()
        return folder

    def _start_driver(self, ck, control, store) -> None:
        from dgserve.model.tokenizer import load_tokenizer

        from .engine import Engine
        from .engine.progress import StoreBoard
        from .group import GroupExecutor
        from .metrics import UnitMetrics

        self.metrics = UnitMetrics(self.unit)
        self.metrics.all_to_all(self.all_to_all)
        fixed = self.topo.engine.fixed_canvas(ck.config.canvas_length)
        executor = (GroupExecutor(self.local, control, self.world, StoreBoard(store, self.world),
                                  attention=self.topo.attention_ranks, fixed_canvas=fixed)
                    if self.world > 1 else self.local)
        self.engine = Engine(ck.model, self.topo.engine, load_tokenizer(ck.folder), executor=executor,
                             ranks=self.topo.attention_ranks, watchdog_s=self.topo.watchdog_s,
                             on_step=self.metrics.on_step)
        self.engine.start()

    # -- requests (rank 0) -----------------------------------------------------------------------------------
    async def generate(self, request, call: str):
        """Events of one request, as a Ray streaming generator; ends with Finished or Failed. `call` is the unit's
        key for this call, made per call and never shown to clients: only `cancel(call)` ends it early."""
        from .messages import failure_event

        if call in self._early:  # cancelled before it started: the caller is gone
            del self._early[call]
            return
        try:
            stream = self.engine.submit(request.to_engine(self.defaults, self.topo.sampler))
        except Exception as e:  # refused: a bad field, over budget, queue full, engine failed
            self.metrics.count(self.engine)
            yield failure_event(e)
            return
        self._calls[call] = stream
        try:
            async for event in stream:
                if isinstance(event, Finished):
                    self.metrics.finished(event.stats.tokens_per_forward)
                yield event
        finally:
            del self._calls[call]
            if not stream.done:  # Ray closed the generator: free the request at the next iteration
                self.engine.cancel(stream)

    async def cancel(self, call: str) -> None:
        """End the unit's call `call` (its own key, never a request id: that is a label any client may reuse)."""
        stream = self._calls.get(call)
        if stream is not None:
            self.engine.cancel(stream)  # its request ends with CANCELLED at the next iteration
            return
        self._early[call] = None  # not started yet, or already ended (then it is forgotten among the oldest)
        if len(self._early) > EARLY_CANCELS:
            self._early.popitem(last=False)

    async def fail(self, reason: str) -> None:
        """Rank 0: the unit found another rank dead or silent; every request ends now with UNAVAILABLE."""
        if self.engine is not None:
            self.engine.failures.unit_failed(reason)

    async def status(self) -> dict:
        out = {"rank": self.rank, "pid": os.getpid(), "slots": sorted(self.local.slots) if self.local else []}
        if self.rank == 0 and self.engine is not None:
            m = self.engine.metrics
            from .engine.budget import PREFIX  # here: the relaying replica imports this module without torch

            placed = sorted(self.engine.placements())
            used = sum(b.used for b in self.engine.budgets)
            cached = sum(b.held(PREFIX) for b in self.engine.budgets)
            out |= {"healthy": self.engine.healthy, "failure": self.engine.failure, "queue_depth": m.queue_depth,
                    "running": m.running, "iterations": m.iterations, "kv_bytes": m.kv_bytes,
                    "budget_used_bytes": used, "budget_bytes": m.budget_bytes,
                    "request_bytes": used - cached, "prefix_bytes": cached, "prefix_entries": m.prefix_entries,
                    "rejections": dict(m.rejections), "errors": dict(m.errors),
                    "admitted_per_rank": dict(m.admitted_per_rank), "steps": m.step_summary(),
                    "request_ids": [rid for rid, _ in placed], "ranks_of_requests": placed,
                    "all_to_all": self.all_to_all, "fit": self.fit}
        else:
            out["healthy"] = self._follower is not None and self._follower.is_alive()
        return out

    async def reset_step_stats(self) -> None:
        self.engine.metrics.recent_steps.clear()

    def shutdown(self) -> None:
        self._stopped.set()
        if self.engine is not None:
            self.engine.stop(timeout=5)
