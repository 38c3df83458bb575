"""The attention/expert split in local processes, without Ray: `dgserve generate --attention-ranks A
--expert-ranks E`, and the tests of the split.

A + E processes (torch.multiprocessing, spawn) form one gloo group: group ranks 0..A-1 are attention ranks (rank 0
runs the engine and broadcasts its plans, as in a Ray unit), A..A+E-1 expert ranks. Attention ranks read every
tensor but the experts and reach the experts through `AllToAllExperts`; expert rank j reads only the experts of
`ExpertPartition.balanced(num_experts, E)` and runs `follow_experts`. Rank 0 sends the results back through a
queue.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp

from dgserve.model.errors import ConfigError


@dataclass(frozen=True)
class SplitRequest:
    prompt_ids: tuple[int, ...]
    sampler: dict  # SamplerSettings knobs over the checkpoint's defaults
    seed: int = 0


@dataclass(frozen=True)
class SplitResult:
    token_ids: tuple[int, ...]
    steps_per_block: tuple[int, ...]
    finish_reason: str


def check_ranks(attention: int, experts: int) -> None:
    if not (isinstance(attention, int) and 1 <= attention <= 64):
        raise ConfigError("attention_ranks", attention, "an integer in 1..64")
    if not (isinstance(experts, int) and 0 <= experts <= 64):
        raise ConfigError("expert_ranks", experts, "an integer in 0..64")


def generate_split(folder: str | Path, requests: list[SplitRequest], attention: int, experts: int,
                   dtype: str = "float32", engine: dict | None = None) -> list[SplitResult]:
    """Run `requests` together through an engine split over `attention` + `experts` local processes."""
    check_ranks(attention, experts)
    world = attention + experts
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="dgserve-split-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, args=(rank, world, attention, str(folder), dtype, store, requests,
                                                      engine or {}, results), daemon=True)
                 for rank in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        bad = [(rank, p.exitcode) for rank, p in enumerate(procs) if p.exitcode != 0]
        out = results.get() if not results.empty() else None
    if bad or out is None:
        raise RuntimeError(f"the split run failed: ranks with a non-zero exit code {bad}")
    if isinstance(out, str):
        raise RuntimeError(out)
    return out


@contextlib.contextmanager
def process_group(rank: int, world: int, store: str):
    """This process's place in a gloo group over a FileStore, listening on loopback only. The process ends on the
    way out (exit code 1 after an exception): every rank first waits for the others at a barrier (at most 60 s)
    and then leaves with os._exit, because tearing gloo down while peers are closing their pairs can abort in C++
    ("terminate called without an active exception")."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    code = 0
    try:
        yield
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        dist.monitored_barrier(timeout=timedelta(seconds=60))
    except Exception as e:
        print(f"rank {rank}: the closing barrier failed: {e}", file=sys.stderr)
        code = code or 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _rank_main(rank: int, world: int, attention: int, folder: str, dtype: str, store: str,
               requests: list[SplitRequest], engine: dict, results) -> None:
    import torch.distributed as dist

    from dgserve.model.config import load_model_config

    from ..group import follow, follow_experts
    from .exchange import Roles
    from .partition import ExpertPartition

    with process_group(rank, world, store):
        cfg = load_model_config(Path(folder))
        roles = Roles(attention, world - attention)
        part = ExpertPartition.balanced(cfg.text.num_experts, roles.experts) if roles.experts else None
        if rank >= attention:
            from dgserve.model.loader import load_expert_shard, parse_dtype

            from .exchange import ExpertServer

            shard = load_expert_shard(folder, part.experts_of(rank - attention), dtype)
            follow_experts(ExpertServer(shard.layers, roles), dist.group.WORLD, rank, threading.Event(),
                           cfg.text.num_layers, cfg.text.hidden_size, parse_dtype(dtype))
            return
        local, model, defaults = _attention_rank(folder, dtype, part, roles, engine)
        if rank == 0:
            _drive(local, model, defaults, requests, engine, world, attention, results)
        else:
            follow(local, dist.group.WORLD, rank, threading.Event(), experts=part is not None)


def _attention_rank(folder: str, dtype: str, part, roles, engine: dict):
    from dgserve.model.loader import load_checkpoint

    from ..engine.config import EngineConfig
    from ..engine.executor import Executor
    from .exchange import AllToAllExperts

    ck = load_checkpoint(folder, dtype=dtype, experts=[] if part is not None else None)
    if part is not None:
        ck.model.experts = AllToAllExperts(part, roles)
    cfg = EngineConfig(**engine)
    return (Executor(ck.model, cfg.page_size or ck.config.canvas_length, cfg.noise_prefetch, 1), ck.model,
            ck.generation)


def _drive(local, model, defaults, requests, engine, world, attention, results) -> None:
    """Rank 0: the engine over the group; every request's result, in order, goes to `results`."""
    import torch.distributed as dist

    from dgserve.model.settings import SamplerSettings

    from ..engine import Engine, EngineConfig, EngineRequest
    from ..engine.events import Finished
    from ..group import GroupExecutor

    executor = GroupExecutor(local, dist.group.WORLD, world, attention=attention) if world > 1 else local
    eng = Engine(model, EngineConfig(**engine), executor=executor, ranks=attention)
    try:
        streams = [eng.submit(EngineRequest(list(r.prompt_ids), SamplerSettings.from_defaults(defaults, **r.sampler),
                                            r.seed)) for r in requests]
        eng.run_until_idle()
        finals = [s.final for s in streams]
        bad = [f for f in finals if not isinstance(f, Finished)]
        results.put(f"a request failed: {bad[0]}" if bad else
                    [SplitResult(tuple(f.token_ids), tuple(f.stats.steps_per_block), f.finish_reason) for f in finals])
    except Exception as e:
        results.put(f"{type(e).__name__}: {e}")
        raise
    finally:
        eng.stop()
