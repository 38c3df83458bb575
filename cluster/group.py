"""Attention ranks in lockstep: rank 0 broadcasts each step plan over the unit's CPU process group, every rank
runs its own requests' part of it, and rank 0 gathers the outcomes. One collective pair per iteration, no Ray
call. An idle rank runs an empty batch (with expert ranks, step 5, it must still join every exchange).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import replace

import torch.distributed as dist

from .engine.errors import UnitFailure
from .engine.executor import Executor
from .engine.plan import ItemKind, StepOutcome, StepPlan
from .engine.progress import Progress, StoreBoard, publish
from .experts.exchange import ExpertServer

log = logging.getLogger("dgserve.group")

STOP = "stop"


class Ownership:
    """Which rank holds which request (every rank keeps its own copy, updated from the plans). `experts`: the
    group has expert ranks, so every attention rank joins each pass (`StepPlan.exchange`)."""

    def __init__(self, rank: int, experts: bool = False):
        self.rank, self.experts = rank, experts
        self.owner: dict[int, int] = {}

    def part(self, plan: StepPlan) -> StepPlan:
        """This rank's share of a plan."""
        for a in plan.admit:
            self.owner[a.rid] = a.rank
        mine = {rid for rid, k in self.owner.items() if k == self.rank}
        part = replace(plan, admit=tuple(a for a in plan.admit if a.rank == self.rank),
                       evict=tuple(r for r in plan.evict if r in mine),
                       release=tuple(r for r in plan.release if r in mine),
                       items=tuple(it for it in plan.items if it.rid in mine),
                       reuse=tuple(p for p in plan.reuse if p.rid in mine),
                       store=tuple(p for p in plan.store if p.rid in mine),
                       exchange=self.experts and bool(plan.items))
        for rid in plan.release:
            self.owner.pop(rid, None)
        return part

    def rows(self, plan: StepPlan, canvas_length: int) -> dict[int, int]:
        """Token rows each attention rank runs in `plan`'s pass (a denoise item is one canvas)."""
        owner = self.owner | {a.rid: a.rank for a in plan.admit}
        rows: dict[int, int] = {}
        for it in plan.items:
            k = owner.get(it.rid, 0)
            rows[k] = rows.get(k, 0) + (canvas_length if it.kind is ItemKind.DENOISE else it.stop - it.start)
        return rows

    def finished(self, outcome: StepOutcome) -> None:
        for c in outcome.canvases:
            if c.finished:
                self.owner.pop(c.rid, None)


def capacity(rows: int, canvas_length: int) -> int:
    """A fixed-capacity pass's row bound: `rows` rounded up to a power-of-two number of canvases, so passes take
    a few shapes only (1, 2, 4, ... canvases)."""
    canvases = max(1, -(-rows // canvas_length))
    return canvas_length * (1 << (canvases - 1).bit_length())


def merge(iteration: int, outcomes: list[StepOutcome]) -> StepOutcome:
    rows: dict[str, int] = {}
    for o in outcomes:
        for k, v in o.rows.items():
            rows[k] = rows.get(k, 0) + v
    return StepOutcome(iteration, tuple(c for o in outcomes for c in o.canvases), rows,
                       max(o.forward_s for o in outcomes), max(o.sampling_s for o in outcomes),
                       sum(o.kv_bytes for o in outcomes), tuple(f for o in outcomes for f in o.failed),
                       max(o.passes for o in outcomes), max(o.exchange_s for o in outcomes),
                       _add_rows([o.expert_rows for o in outcomes]), tuple(e for o in outcomes for e in o.stored),
                       sum(o.prefix_bytes for o in outcomes), sum(o.images for o in outcomes),
                       max(o.vision_s for o in outcomes))


def _add_rows(per_rank: list[tuple[tuple[int, ...], ...]]) -> tuple[tuple[int, ...], ...]:
    """Rows per layer and expert rank, summed over the attention ranks that sent them."""
    layers = max((len(r) for r in per_rank), default=0)
    out = []
    for layer in range(layers):
        parts = [r[layer] for r in per_rank if len(r) > layer]
        out.append(tuple(sum(col) for col in zip(*parts, strict=True)))
    return tuple(out)


class GroupExecutor:
    """Rank 0's executor (a StepExecutor): every plan runs on all ranks of the group. `board` reads the other
    ranks' progress (their publishers write it to the unit's store)."""

    def __init__(self, local: Executor, group, world: int, board: StoreBoard | None = None,
                 attention: int | None = None, fixed_canvas: int = 0):
        """`world` ranks in `group`: `attention` attention ranks (default: all), then expert ranks. `fixed_canvas`:
        the canvas length, when the expert exchange has fixed capacity (0: variable)."""
        self.local, self.group, self.world, self.board = local, group, world, board
        self.ownership = Ownership(0, experts=attention is not None and attention < world)
        self.fixed_canvas = fixed_canvas if self.ownership.experts else 0
        self.capacities: Counter[int] = Counter()  # fixed-capacity passes run, by row bound

    def progress(self) -> int:
        return self.local.progress() + (self.board.total() if self.board is not None else 0)

    def run(self, plan: StepPlan) -> StepOutcome:
        if self.fixed_canvas and plan.items:
            rows = max(self.ownership.rows(plan, self.fixed_canvas).values())
            plan = replace(plan, capacity=capacity(rows, self.fixed_canvas))
            self.capacities[plan.capacity] += 1
        try:
            dist.broadcast_object_list([plan], src=0, group=self.group)
        except Exception as e:
            raise UnitFailure(f"broadcasting the step plan failed: {e}") from e
        error = None
        try:
            local = self.local.run(self.ownership.part(plan))
        except Exception as e:  # still join the gather, or the other ranks hang
            log.exception("rank 0 failed to run iteration %d", plan.iteration)
            local, error = e, e
        outs = [None] * self.world
        try:
            dist.gather_object(local if error is None else repr(error), outs, dst=0, group=self.group)
        except Exception as e:
            raise UnitFailure(f"gathering step outcomes failed: {e}") from e
        failed = [f"rank {k}: {o}" for k, o in enumerate(outs) if not isinstance(o, StepOutcome)]
        if error is not None:
            raise error
        if failed:
            raise UnitFailure("; ".join(failed))
        out = merge(plan.iteration, outs)
        self.ownership.finished(out)
        return out

    def heartbeat(self, iteration: int) -> None:
        """An empty iteration: keeps idle ranks' collectives alive and finds a dead rank while idle."""
        self.run(StepPlan(iteration))

    def stop(self) -> None:
        try:
            dist.broadcast_object_list([STOP], src=0, group=self.group)
        except Exception as e:  # a rank already gone: nothing left to stop
            log.warning("stopping the ranks: %s", e)

    def close(self) -> None:
        self.local.close()


def follow(local: Executor, group, rank: int, stopped: threading.Event, store=None, period_s: float = 1.0,
           experts: bool = False) -> None:
    """A follower attention rank's loop: run rank 0's plans until told to stop (publishing its progress to `store`;
    `experts`: the group has expert ranks)."""
    ownership = Ownership(rank, experts)

    def step(plan: StepPlan) -> StepOutcome:
        out = local.run(ownership.part(plan))
        ownership.finished(out)
        return out

    _follow(step, group, rank, stopped, local.progress, store, period_s)


def follow_experts(server: ExpertServer, group, rank: int, stopped: threading.Event, layers: int, hidden: int,
                   dtype, store=None, period_s: float = 1.0) -> None:
    """An expert rank's loop: for every plan with items, join each layer's exchange (it runs no attention code and
    holds no request state); an empty outcome goes back so that rank 0's gather completes."""
    progress = Progress()

    def step(plan: StepPlan) -> StepOutcome:
        for layer in range(layers if plan.items else 0):
            server.serve_layer(layer, hidden, dtype, plan.capacity)
            progress.beat()
        return StepOutcome(plan.iteration, ())

    _follow(step, group, rank, stopped, lambda: progress.count, store, period_s)


def _follow(step, group, rank: int, stopped: threading.Event, progress, store, period_s: float) -> None:
    """Receive rank 0's plans until STOP, run `step(plan)` on each and send its outcome (or its error) back."""
    left = threading.Event()
    if store is not None:
        publish(store, rank, progress, period_s, left, stopped)
    try:
        while not stopped.is_set():
            box = [None]
            try:
                dist.broadcast_object_list(box, src=0, group=group)
            except Exception as e:
                log.error("rank %d: receiving the plan failed (%s); leaving", rank, e)
                return
            plan = box[0]
            if plan == STOP:
                return
            try:
                out: StepOutcome | str = step(plan)
            except Exception as e:
                log.exception("rank %d failed iteration %d", rank, plan.iteration)
                out = f"{type(e).__name__}: {e}"
            try:
                dist.gather_object(out, None, dst=0, group=group)
            except Exception as e:
                log.error("rank %d: sending the outcome failed (%s); leaving", rank, e)
                return
    finally:
        left.set()
