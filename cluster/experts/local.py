"""The attention/expert split in local processes, without Ray: `dgserve generate --attention-ranks A
--expert-ranks E`, and the tests of the split.

A + E processes (torch.multiprocessing, spawn) form one gloo group: group ranks 0..A-1 are attention ranks (rank 0
runs the engine and broadcasts its plans, as in a Ray unit), A..A+E-1 expert ranks. Attention ranks read every
tensor but the experts and reach the experts through `AllToAllExperts`; expert rank j reads only the experts of
`ExpertPartition.balanced(num_experts, E)` and runs `follow_experts`. Ranks write their results to files in a
temporary folder (`Results`), read once every process has ended.

`run_split` also runs the checks of the split's exactness: each request alone before the batch, and teacher-forced
passes (a prompt encoded and a canvas denoised in one packed pass per attention rank, its logits sent back).
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
    cached_tokens: int = 0  # prompt tokens it took from the prefix cache


@dataclass(frozen=True)
class ForcedCase:
    """A teacher-forced pass: `prompt_ids` encoded, then the canvas `canvas_ids` denoised (no self-conditioning)."""

    prompt_ids: tuple[int, ...]
    canvas_ids: tuple[int, ...]


@dataclass(frozen=True)
class SplitRun:
    batched: list[SplitResult]  # every request submitted at once
    alone: list[SplitResult] | None  # each request alone, one after the other (before the batch), if asked
    logits: list[torch.Tensor]  # each ForcedCase's logits [C, V] (float32), case i on attention rank i % A
    capacities: dict[int, int]  # fixed-capacity passes by row bound (empty with the variable exchange)


class Results:
    """What the ranks send back: one file per key in a folder (a pipe would block a rank on a large result until
    the parent reads it, and the parent reads after the ranks end)."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.folder.mkdir(exist_ok=True)

    def put(self, key: str, value) -> None:
        tmp = self.folder / f"{key}.part"
        torch.save(value, tmp)
        tmp.rename(self.folder / key)  # whole or absent

    def read(self) -> dict:
        return {p.name: torch.load(p, weights_only=False) for p in self.folder.iterdir() if p.suffix != ".part"}


def check_ranks(attention: int, experts: int) -> None:
    if not (isinstance(attention, int) and 1 <= attention <= 64):
        raise ConfigError("attention_ranks", attention, "an integer in 1..64")
    if not (isinstance(experts, int) and 0 <= experts <= 64):
        raise ConfigError("expert_ranks", experts, "an integer in 0..64")


def generate_split(folder: str | Path, requests: list[SplitRequest], attention: int, experts: int,
                   dtype: str = "float32", engine: dict | None = None,
                   experts_dtype: str = "auto") -> list[SplitResult]:
    """Run `requests` together through an engine split over `attention` + `experts` local processes."""
    return run_split(folder, requests, attention, experts, dtype, engine, experts_dtype=experts_dtype).batched


def run_split(folder: str | Path, requests: list[SplitRequest], attention: int, experts: int,
              dtype: str = "float32", engine: dict | None = None, alone: bool = False,
              forced: tuple[ForcedCase, ...] = (), experts_dtype: str = "auto") -> SplitRun:
    """`requests` through an engine split over `attention` + `experts` local processes: batched, and (`alone`) each
    alone first; `forced` teacher-forced passes run before the engine starts."""
    check_ranks(attention, experts)
    world = attention + experts
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="dgserve-split-") as tmp:
        store = os.path.join(tmp, "store")
        results = Results(os.path.join(tmp, "results"))
        procs = [ctx.Process(target=_rank_main, args=(rank, world, attention, str(folder), (dtype, experts_dtype),
                                                      store, requests, engine or {}, alone, forced, results),
                             daemon=True)
                 for rank in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        bad = [(rank, p.exitcode) for rank, p in enumerate(procs) if p.exitcode != 0]
        got = results.read()
    errors = [v for v in got.values() if isinstance(v, str)]
    if errors:
        raise RuntimeError(errors[0])
    if bad or "batched" not in got:
        raise RuntimeError(f"the split run failed: ranks with a non-zero exit code {bad}")
    logits = [None] * len(forced)
    for rank in range(attention):
        for i, t in zip(range(rank, len(forced), attention), got.get(f"logits{rank}", []), strict=True):
            logits[i] = t
    return SplitRun(got["batched"], got.get("alone"), logits, got.get("capacities", {}))


@contextlib.contextmanager
def process_group(rank: int, world: int, store: str):
    """This process's place in a gloo group over a FileStore, listening on loopback only. The process ends on the
    way out. After an exception it leaves at once with exit code 1 (a peer waiting on it in a collective then sees
    the connection close, instead of hanging); otherwise every rank first waits for the others at a barrier (at most
    60 s) and then leaves with os._exit, because tearing gloo down while peers are closing their pairs can abort in C++
    ("terminate called without an active exception")."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        yield
    except BaseException:  # leave at once: the peers' pending collectives then fail fast (connection closed)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    code = 0
    try:
        dist.monitored_barrier(timeout=timedelta(seconds=60))
    except Exception as e:
        print(f"rank {rank}: the closing barrier failed: {e}", file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _rank_main(rank: int, world: int, attention: int, folder: str, dtypes: tuple[str, str], store: str,
               requests: list[SplitRequest], engine: dict, alone: bool, forced: tuple[ForcedCase, ...],
               results) -> None:
    import torch.distributed as dist

    from dgserve.model.config import load_model_config

    from ..group import follow, follow_experts
    from .exchange import Roles
    from .partition import ExpertPartition

    dtype, experts_dtype = dtypes
    with process_group(rank, world, store):
        cfg = load_model_config(Path(folder))
        roles = Roles(attention, world - attention)
        part = ExpertPartition.balanced(cfg.text.num_experts, roles.experts) if roles.experts else None
        if rank >= attention:
            from dgserve.model.loader import load_expert_shard, parse_dtype

            from .exchange import ExpertServer

            shard = load_expert_shard(folder, part.experts_of(rank - attention), dtype, experts_dtype=experts_dtype)
            server = ExpertServer(shard.layers, roles, top_k=cfg.text.top_k_experts)
            for layer in range(cfg.text.num_layers if forced else 0):  # the teacher-forced pass
                server.serve_layer(layer, cfg.text.hidden_size, parse_dtype(dtype))
            follow_experts(server, dist.group.WORLD, rank, threading.Event(), cfg.text.num_layers,
                           cfg.text.hidden_size, parse_dtype(dtype))
            return
        local, model, defaults = _attention_rank(folder, dtypes, part, roles, engine)
        if forced:
            results.put(f"logits{rank}", _forced_pass(local, model, forced[rank::attention]))
        if rank == 0:
            _drive(local, model, defaults, requests, engine, world, attention, alone, results)
        else:
            follow(local, dist.group.WORLD, rank, threading.Event(), experts=part is not None)


def _attention_rank(folder: str, dtypes: tuple[str, str], part, roles, engine: dict):
    from dgserve.model.loader import load_checkpoint

    from ..engine.config import EngineConfig
    from ..engine.executor import Executor
    from .exchange import AllToAllExperts

    ck = load_checkpoint(folder, dtype=dtypes[0], experts=[] if part is not None else None, experts_dtype=dtypes[1])
    if part is not None:
        ck.model.experts = AllToAllExperts(part, roles)
    cfg = EngineConfig(**engine)
    return (Executor(ck.model, cfg.page_size or ck.config.canvas_length, cfg.noise_prefetch, 1,
                     cfg.fused_sampler(ck.model.device.type)), ck.model,
            ck.generation)


def _forced_pass(local, model, cases: tuple[ForcedCase, ...]) -> list[torch.Tensor]:
    """This attention rank's teacher-forced cases in one packed pass (each prompt encoded, then its canvas
    denoised); an attention rank without cases joins the exchanges with zero rows."""
    from dgserve.model.transformer import WorkItem

    if not cases:
        local.join_exchange()
        return []
    items = []
    for c in cases:
        cache = model.new_cache()
        items += [WorkItem(cache, torch.tensor(c.prompt_ids), encode=True),
                  WorkItem(cache, torch.tensor(c.canvas_ids), encode=False)]
    with torch.inference_mode():
        h = model.forward(items)
    out, row = [], 0
    for c in cases:
        row += len(c.prompt_ids)
        out.append(model.logits(h[row:row + len(c.canvas_ids)]).clone())
        row += len(c.canvas_ids)
    return out


def _drive(local, model, defaults, requests, engine, world, attention, alone, results) -> None:
    """Rank 0: the engine over the group; the requests' results, in order, go to `results` (each alone first,
    if `alone`, then all at once)."""
    import torch.distributed as dist

    from dgserve.model.settings import SamplerSettings

    from ..engine import Engine, EngineConfig, EngineRequest
    from ..engine.events import Finished
    from ..group import GroupExecutor

    fixed = EngineConfig(**engine).fixed_canvas(model.config.canvas_length)
    executor = (GroupExecutor(local, dist.group.WORLD, world, attention=attention, fixed_canvas=fixed)
                if world > 1 else local)
    eng = Engine(model, EngineConfig(**engine), executor=executor, ranks=attention)
    def run(batch: list[SplitRequest]) -> list[SplitResult]:
        streams = [eng.submit(EngineRequest(list(r.prompt_ids), SamplerSettings.from_defaults(defaults, **r.sampler),
                                            r.seed)) for r in batch]
        eng.run_until_idle()
        finals = [s.final for s in streams]
        bad = [f for f in finals if not isinstance(f, Finished)]
        if bad:
            raise RuntimeError(f"a request failed: {bad[0]}")
        return [SplitResult(tuple(f.token_ids), tuple(f.stats.steps_per_block), f.finish_reason,
                            f.stats.cached_tokens) for f in finals]

    try:
        if alone:
            results.put("alone", [r for req in requests for r in run([req])])
        results.put("batched", run(requests))
        results.put("capacities", dict(getattr(executor, "capacities", {})))
    except Exception as e:
        results.put("error", f"{type(e).__name__}: {e}")
        raise
    finally:
        eng.stop()
