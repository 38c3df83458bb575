"""The executor: runs a step plan as one packed forward, then samples next to the logits.

It owns everything with tensors in it: the model, every request's KV cache, context tokens, generator, noise
stream and block denoiser. It never decides anything; the driver's plan says what to run. Token rows of all
work items go through the dense MLP and the experts as one batch per layer (model.forward); a canvas's logits
live only while its step is sampled, one canvas at a time, and only its self-conditioning embedding [C, D] is
kept for the next step.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Protocol

import torch

from dgserve.kernels.vocab import VocabOut, vocab_pass
from dgserve.model.cache import KVCache, PrefixKV, distinct_bytes
from dgserve.model.config import num_blocks
from dgserve.model.sampler import BlockDenoiser, NoiseStream, StepResult, finalize_block
from dgserve.model.step_graphs import DecoderGraphs
from dgserve.model.transformer import DiffusionGemma, WorkItem, media_rows
from dgserve.model.vision import as_patches

from .errors import Code, UnitFailure
from .graphs import run_pass
from .plan import Admit, CanvasResult, ItemFailure, ItemKind, PlanItem, Prefix, StepOutcome, StepPlan
from .progress import Progress

log = logging.getLogger("dgserve.engine")


class StepExecutor(Protocol):
    """What runs the engine's plans: this process's Executor, or rank 0's GroupExecutor over a unit's ranks."""

    def run(self, plan: StepPlan) -> StepOutcome:
        """Run one plan; raises UnitFailure when the unit cannot go on, anything else fails the plan only."""
        ...

    def heartbeat(self, iteration: int) -> None:
        """An empty iteration while idle (a group finds a rank that died meanwhile)."""
        ...

    def progress(self) -> int:
        """A count that moves while any rank works (the watchdog's sign of life; only a change matters)."""
        ...

    def stop(self) -> None:
        """Release the other ranks (the engine is stopping cleanly)."""
        ...

    def close(self) -> None:
        """Free this process's threads."""
        ...


class PlanError(RuntimeError):
    """The plan does not match the executor's state (a driver bug, never a user error)."""


def item_failure(rid: int, what: str, e: Exception) -> ItemFailure:
    """The failure of one request: out of memory is retriable (RESOURCE_EXHAUSTED), anything else INTERNAL."""
    log.warning("request %d failed while %s: %s: %s", rid, what, type(e).__name__, e)
    if isinstance(e, torch.OutOfMemoryError | MemoryError):
        return ItemFailure(rid, Code.RESOURCE_EXHAUSTED, f"out of memory while {what} ({e}); send it again later")
    return ItemFailure(rid, Code.INTERNAL, f"internal error while {what}: {type(e).__name__}: {e}")


def _by_request(items: list[PlanItem]) -> list[tuple[int, list[PlanItem]]]:
    """A plan's items grouped by request, in plan order (a request's encode items stay before its denoise)."""
    groups: dict[int, list[PlanItem]] = {}
    for it in items:
        groups.setdefault(it.rid, []).append(it)
    return list(groups.items())


@dataclass
class Pass:
    """One forward pass over some of a plan's items."""

    items: list[PlanItem]
    work: list[WorkItem]
    hidden: torch.Tensor
    rows: dict[str, int]


@dataclass
class SampledGroup:
    """What one thread's share of the per-canvas work yields."""

    results: list[CanvasResult] = field(default_factory=list)
    failed: dict[int, ItemFailure] = field(default_factory=dict)
    sampling_s: float = 0.0
    logits_s: float = 0.0


@dataclass
class Slot:
    """One request's tensors and sampler state."""

    admit: Admit
    context: list[int]  # prompt + committed blocks: the positions encode items read
    noise: NoiseStream
    temps: torch.Tensor
    blocks: int
    cache: object | None = None  # KVCache; None after eviction until replayed
    block: int = 0
    denoiser: BlockDenoiser | None = None
    soft_CD: torch.Tensor | None = None
    # the vision tower's rows of each image (by its index in admit.media), made when a prefill first needs them and
    # kept for a replay after an eviction
    soft_rows: dict[int, torch.Tensor] = field(default_factory=dict)


class Executor:
    """`sampler_threads` > 1 spreads the per-canvas work after the layers (LM head, sampling step,
    self-conditioning embedding) over that many threads: every canvas has its own generator and state, so
    canvases are independent, and torch releases the GIL inside each op. It is the CPU's share of batching:
    one canvas alone has nothing to overlap."""

    def __init__(self, model: DiffusionGemma, page_size: int, prefetch_noise: bool = True,
                 sampler_threads: int = 1, fused: bool = False, graphs: DecoderGraphs | None = None):
        """`fused`: canvases step through the fused vocabulary pass (EngineConfig.sampler). `graphs`: the decoder
        step graphs canvases run through (graphs.py)."""
        self.model, self.page_size, self.prefetch_noise, self.fused = model, page_size, prefetch_noise, fused
        self.graphs = graphs
        self.slots: dict[int, Slot] = {}
        self.prefixes: dict[int, PrefixKV] = {}  # cached prompt prefixes by entry id (the driver decides which)
        self.sampler_threads = sampler_threads
        self._progress = Progress()
        self._pool = (ThreadPoolExecutor(sampler_threads - 1, thread_name_prefix="dgserve-sampler")
                      if sampler_threads > 1 else None)

    def heartbeat(self, iteration: int) -> None:
        """Nothing to keep alive in one process."""

    def stop(self) -> None:
        """No other ranks to release."""

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def kv_bytes(self) -> int:
        """Bytes of KV held, requests' caches and cached prefixes together (a shared page counts once)."""
        return self._held_bytes()[0]

    def _held_bytes(self) -> tuple[int, int]:
        """(all KV bytes, the cached prefixes' bytes), walking the prefixes' tensors once."""
        prefix = [t for p in self.prefixes.values() for t in p.tensors()]
        held = [t for s in self.slots.values() if s.cache is not None for t in s.cache.tensors()]
        return distinct_bytes(held + prefix), distinct_bytes(prefix)

    def _admit(self, a: Admit) -> None:
        cfg = self.model.config
        gen = torch.Generator(device=self.model.device).manual_seed(a.seed)
        self.slots[a.rid] = Slot(a, list(a.prompt_ids),
                                 NoiseStream(gen, cfg.canvas_length, cfg.text.vocab_size, self.prefetch_noise,
                                             self.fused),
                                 a.settings.temperatures(), num_blocks(a.settings.max_new_tokens, cfg.canvas_length))

    def progress(self) -> int:
        """Work done so far (layers run, canvases sampled, requests admitted): the watchdog's sign of life."""
        return self._progress.count

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> StepOutcome:
        """Runs a plan; a failure that belongs to one request fails only that request (see failures.py)."""
        for rid in plan.release:  # frees first, so a failure further on cannot leak them
            self.slots.pop(rid, None)
        for rid in plan.evict:
            if rid in self.slots:
                self.slots[rid].cache = None
        failed: dict[int, ItemFailure] = {}
        for a in plan.admit:
            self._isolated(a.rid, "admitting it", failed, self._admit, a)
            self._progress.beat()
        for p in plan.reuse:
            if p.rid not in failed:
                self._isolated(p.rid, "starting its cache from a cached prefix", failed, self._reuse, p)
        for entry in plan.drop:
            self.prefixes.pop(entry, None)
        items = self._prepare([it for it in plan.items if it.rid not in failed], failed)
        images, vision_s = self._vision(items, failed)
        items = [it for it in items if it.rid not in failed]
        if plan.exchange and (fixed := getattr(self.model.experts, "set_capacity", None)) is not None:
            fixed(plan.capacity)  # the pass's exchange: fixed capacity from the plan, or variable (0)
        if not items:
            if plan.exchange:  # the expert ranks wait for this rank at every layer: join with zero rows
                self.join_exchange()
            return self._outcome(plan, (), {}, 0.0, 0.0, failed, int(plan.exchange), (), images, vision_s)
        self._want(plan.store, True)
        try:
            t0 = time.perf_counter()
            passes = self._forward(_by_request(items), failed, lockstep=plan.exchange)
            forward_s = time.perf_counter() - t0
            stored = self._store(plan.store, failed)
        finally:
            self._want(plan.store, False)
        canvases, sampling_s, logits_s = self._sample(passes, failed)
        rows = {k.value: sum(p.rows.get(k.value, 0) for p in passes) for k in ItemKind}
        return self._outcome(plan, canvases, rows, forward_s + logits_s, sampling_s, failed, len(passes), stored,
                             images, vision_s)

    # -- the prefix cache --------------------------------------------------------------------------------------
    def _reuse(self, p: Prefix) -> None:
        prefix = self.prefixes.get(p.entry)
        if prefix is None or prefix.length != p.positions:
            raise PlanError(f"request {p.rid}: cached prefix {p.entry} of {p.positions} positions is not held here")
        slot = self.slots.get(p.rid)
        if slot is None:
            raise PlanError(f"reuse for unknown request {p.rid}")
        slot.cache = KVCache.from_prefix(self.model.cfg, self.model.dtype, prefix, self.model.device)

    def _want(self, stores: tuple[Prefix, ...], on: bool) -> None:
        """Have the caches of `stores` record their state at the stored positions during the pass (or stop)."""
        wanted: dict[int, set[int]] = {}
        for s in stores:
            wanted.setdefault(s.rid, set()).add(s.positions)
        for rid, positions in wanted.items():
            slot = self.slots.get(rid)
            if slot is not None and slot.cache is not None:
                slot.cache.want(frozenset(positions) if on else frozenset())

    def _store(self, stores: tuple[Prefix, ...], failed: dict[int, ItemFailure]) -> tuple[int, ...]:
        """Keep the states the plan asked for (a request that failed in the pass stores nothing)."""
        stored = []
        for s in stores:
            slot = self.slots.get(s.rid)
            if s.rid in failed or slot is None or slot.cache is None:
                continue
            prefix = slot.cache.snapshot(s.positions)
            if prefix is not None:
                self.prefixes[s.entry] = prefix
                stored.append(s.entry)
        return tuple(stored)

    def _outcome(self, plan, canvases, rows, forward_s, sampling_s, failed, passes, stored=(), images=0,
                 vision_s=0.0) -> StepOutcome:
        for rid in failed:
            self.slots.pop(rid, None)
        done = {c.rid for c in canvases if c.finished}
        canvases = tuple(c for c in canvases if c.rid not in failed)
        for rid in done:
            self.slots.pop(rid, None)
        take = getattr(self.model.experts, "take_stats", None)  # expert ranks: what the exchanges carried
        exchange_s, expert_rows = take() if take is not None else (0.0, ())
        kv, prefix = self._held_bytes()
        return StepOutcome(plan.iteration, canvases, rows, forward_s, sampling_s, kv, tuple(failed.values()),
                           passes, exchange_s, expert_rows, stored, prefix, images, vision_s)

    def _isolated(self, rid: int, what: str, failed: dict[int, ItemFailure], fn, *args):
        """fn(*args); an exception fails request `rid` only (recorded in `failed`). A UnitFailure still ends the
        unit."""
        try:
            return fn(*args)
        except UnitFailure:
            raise
        except Exception as e:
            failed[rid] = item_failure(rid, what, e)
            return None

    def _prepare(self, items: list[PlanItem], failed: dict[int, ItemFailure]) -> list[PlanItem]:
        """Checks each request's items against its state and creates what they need (cache, block denoiser);
        a request whose check or allocation fails is left out of the pass, alone."""
        for rid, mine in _by_request(items):
            self._isolated(rid, "preparing its step", failed, self._prepare_request, rid, mine)
        return [it for it in items if it.rid not in failed]

    def _prepare_request(self, rid: int, items: list[PlanItem]) -> None:
        slot = self.slots.get(rid)
        if slot is None:
            raise PlanError(f"plan item for unknown request {rid}")
        if slot.cache is None:
            slot.cache = self.model.new_cache(self.page_size)
        pos = slot.cache.length
        for it in items:
            if it.kind is ItemKind.DENOISE:
                if slot.denoiser is None:
                    slot.denoiser = BlockDenoiser(slot.admit.settings, slot.noise, slot.temps)
                continue
            if it.start != pos or not pos < it.stop <= len(slot.context):
                raise PlanError(f"request {rid}: {it.kind} [{it.start}, {it.stop}) but the cache is at {pos} "
                                f"of {len(slot.context)} context positions")
            pos = it.stop

    def _forward(self, groups: list[tuple[int, list[PlanItem]]], failed: dict[int, ItemFailure],
                 lockstep: bool = False) -> list[Pass]:
        """One packed pass over every request's items. If it fails (out of memory for the whole batch, one
        request's bad rows), every cache is rolled back and the pass is split in halves by request, down to the
        one request that fails alone: the others run with the same rows, so the same tokens (RNG untouched: the
        draws happen after the pass). In `lockstep` (expert ranks wait at every layer's exchange) a pass cannot be
        run again alone: its failure fails the unit."""
        items = [it for _, mine in groups for it in mine]
        marks = {rid: self.slots[rid].cache.mark() for rid, _ in groups}
        try:
            work, rows = self._work_items(items)
            return [Pass(items, work, run_pass(self.model, self.graphs, work, self._progress.beat), rows)]
        except UnitFailure:
            raise
        except Exception as e:
            if lockstep:
                raise UnitFailure(f"a pass with expert exchanges failed ({type(e).__name__}: {e}); the ranks are "
                                  "out of step") from e
            for rid, m in marks.items():
                self.slots[rid].cache.rollback(m)
            if len(groups) == 1:
                failed[groups[0][0]] = item_failure(groups[0][0], "running its forward pass", e)
                return []
            log.warning("a packed pass of %d requests failed (%s: %s); splitting it", len(groups),
                        type(e).__name__, e)
            half = len(groups) // 2
            return self._forward(groups[:half], failed) + self._forward(groups[half:], failed)

    def join_exchange(self) -> None:
        """A pass with no rows of this rank's own: each layer's exchange, with zero rows."""
        cfg = self.model.config.text
        empty = torch.empty(0, cfg.hidden_size, dtype=self.model.dtype, device=self.model.device)
        ids = torch.empty(0, cfg.top_k_experts, dtype=torch.long, device=self.model.device)
        for layer in range(cfg.num_layers):
            self.model.experts(layer, empty, ids, torch.empty(0, cfg.top_k_experts, device=self.model.device))
            self._progress.beat()

    def _work_items(self, items: list[PlanItem]) -> tuple[list[WorkItem], dict[str, int]]:
        work, rows = [], {k.value: 0 for k in ItemKind}
        for it in items:
            slot = self.slots[it.rid]
            if it.kind is ItemKind.DENOISE:
                work.append(WorkItem(slot.cache, slot.denoiser.canvas_C, encode=False, soft_CD=slot.soft_CD))
                rows[it.kind.value] += slot.denoiser.canvas_C.shape[0]
                continue
            ids = to_device(torch.tensor(slot.context[it.start:it.stop], dtype=torch.long), self.model.device)
            spans = list(slot.admit.spans) if it.kind is ItemKind.PREFILL else []
            rows_of = [slot.soft_rows.get(k) for k in range(len(spans))]
            media, media_MD = media_rows(spans, rows_of, it.start, it.stop)
            work.append(WorkItem(slot.cache, ids, encode=True, media=media, media_MD=media_MD))
            rows[it.kind.value] += it.stop - it.start
        return work, rows

    # -- the vision tower ----------------------------------------------------------------------------------------
    def _vision(self, items: list[PlanItem], failed: dict[int, ItemFailure]) -> tuple[int, float]:
        """The tower's rows for every image a prefill item of this pass holds and no earlier pass encoded: all of
        the iteration's images in one tower call (a request whose images fail there fails alone)."""
        wanted: dict[int, list[int]] = {}
        for it in items:
            slot = self.slots[it.rid]
            if it.kind is not ItemKind.PREFILL or not slot.admit.spans:
                continue
            for k, (a, b) in enumerate(slot.admit.spans):
                if it.start <= a and b <= it.stop and k not in slot.soft_rows:
                    wanted.setdefault(it.rid, []).append(k)
        if not wanted:
            return 0, 0.0
        t0 = time.perf_counter()
        try:
            self._encode_images(wanted)
        except UnitFailure:
            raise
        except Exception:
            for rid, ks in wanted.items():  # alone, to find whose images fail
                self._isolated(rid, "encoding its images", failed, self._encode_images, {rid: ks})
        self._progress.beat()
        return sum(len(ks) for ks in wanted.values()), time.perf_counter() - t0

    def _encode_images(self, wanted: dict[int, list[int]]) -> None:
        if self.model.vision is None:
            raise PlanError("a request holds images but this rank has no vision tower loaded")
        order = [(rid, k) for rid, ks in wanted.items() for k in ks]
        out = self.model.vision.encode([as_patches(self.slots[rid].admit.media[k]) for rid, k in order],
                                       self._progress.beat)
        for (rid, k), rows_MD in zip(order, out, strict=True):
            self.slots[rid].soft_rows[k] = rows_MD

    def _sample(self, passes: list[Pass], failed: dict[int, ItemFailure]) -> tuple[list[CanvasResult], float, float]:
        canvases = []
        for p in passes:
            row = 0
            for it, w in zip(p.items, p.work, strict=True):
                n = w.ids.shape[0]
                if it.kind is ItemKind.DENOISE:
                    canvases.append((it.rid, p.hidden[row:row + n]))
                row += n
        groups = self._groups(len(canvases))
        futures = [self._pool.submit(self._sample_group, canvases[g]) for g in groups[1:]]
        try:
            parts = [self._sample_group(canvases[groups[0]])]
        finally:  # every helper's work ends before the next plan, whatever happened here
            wait(futures)
        parts += [f.result() for f in futures]
        out = [r for part in parts for r in part.results]
        for part in parts:
            failed.update(part.failed)
        # Wall time of the sampling phase, split as the threads spent it.
        busy = [part.sampling_s + part.logits_s for part in parts]
        scale = max(busy) / sum(busy) if sum(busy) else 0.0
        return out, scale * sum(p.sampling_s for p in parts), scale * sum(p.logits_s for p in parts)

    def _groups(self, n: int) -> list[slice]:
        k = min(self.sampler_threads, n) if self._pool is not None else 1
        if k <= 1:
            return [slice(0, n)]
        bounds = [round(i * n / k) for i in range(k + 1)]
        return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]

    def _sample_group(self, canvases: list[tuple[int, torch.Tensor]]) -> SampledGroup:
        """The per-canvas work of some canvases; one canvas's failure fails its request only."""
        out = SampledGroup()
        with torch.inference_mode():
            if self.fused:
                self._sample_fused(canvases, out)
                return out
            for rid, hidden in canvases:
                t0 = time.perf_counter()
                try:
                    logits_CV = self.model.logits(hidden)
                    t1 = time.perf_counter()
                    out.results.append(self._step(rid, logits_CV))
                except UnitFailure:
                    raise
                except Exception as e:
                    out.failed[rid] = item_failure(rid, "sampling its step", e)
                    t1 = time.perf_counter()
                out.sampling_s += time.perf_counter() - t1
                out.logits_s += t1 - t0
                self._progress.beat()
        return out

    def _sample_fused(self, canvases: list[tuple[int, torch.Tensor]], out: SampledGroup) -> None:
        """One fused vocabulary pass over all the group's canvas rows, then each canvas's step. If the shared pass
        fails, each canvas runs alone, so a failure stays with its request (its draws are not made again)."""
        t0 = time.perf_counter()
        draws: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for rid, _ in canvases:
            try:
                draws[rid] = self.slots[rid].noise.step_keys()
            except Exception as e:
                out.failed[rid] = item_failure(rid, "drawing its step's noise", e)
        ready = [(rid, h) for rid, h in canvases if rid in draws]
        try:
            passes = [(ready, self._vocab_pass(ready, draws))] if ready else []
        except Exception as e:
            log.warning("a fused vocabulary pass over %d canvases failed (%s); running them one by one",
                        len(ready), e)
            passes = []
            for one in ready:
                try:
                    passes.append(([one], self._vocab_pass([one], draws)))
                except Exception as err:
                    out.failed[one[0]] = item_failure(one[0], "its vocabulary pass", err)
        t1 = time.perf_counter()
        out.logits_s += t1 - t0
        C = self.model.config.canvas_length
        for group, res in passes:
            for i, (rid, _) in enumerate(group):
                try:
                    out.results.append(self._step_fused(rid, _rows(res, slice(i * C, (i + 1) * C)), draws[rid][1]))
                except UnitFailure:
                    raise
                except Exception as e:
                    out.failed[rid] = item_failure(rid, "sampling its step", e)
                self._progress.beat()
        out.sampling_s += time.perf_counter() - t1

    def _vocab_pass(self, canvases: list[tuple[int, torch.Tensor]],
                    draws: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> VocabOut:
        C = self.model.config.canvas_length
        hidden = torch.cat([h for _, h in canvases])
        temps = torch.stack([self.slots[rid].denoiser.temperature for rid, _ in canvases]).float()
        temps = to_device(temps, hidden.device).repeat_interleave(C)  # one copy for the group
        keys = torch.cat([draws[rid][0] for rid, _ in canvases])
        return vocab_pass(hidden, self.model.weights.embed, self.model.cfg.final_logit_softcapping, temps, keys)

    def _step_fused(self, rid: int, res: VocabOut, renoise_C: torch.Tensor) -> CanvasResult:
        block = self.slots[rid].denoiser
        return self._after_step(rid, block.step_fused(res, renoise_C), lambda: self.model.soft_from_mean(res.soft_CD))

    def _step(self, rid: int, logits_CV: torch.Tensor) -> CanvasResult:
        block = self.slots[rid].denoiser
        res = block.step(logits_CV, self.model.dtype)

        def soft() -> torch.Tensor:  # the [C, D] embedding the next step needs, not the [C, V] probabilities
            source, block.soft_source_CV = block.soft_source_CV, None
            return self.model.soft_embedding(source)

        return self._after_step(rid, res, soft)

    def _after_step(self, rid: int, res: StepResult, soft) -> CanvasResult:
        """The canvas's result; the next step's self-conditioning input (`soft()`), or the block committed."""
        slot = self.slots[rid]
        block, s = slot.denoiser, slot.admit.settings
        draft = tuple(res.argmax_C.tolist()) if slot.admit.drafts else None
        if not block.done:
            slot.soft_CD = soft()
            return CanvasResult(rid, slot.block, block.steps, res.accepted, res.mean_entropy, False, False,
                                draft=draft)
        argmax = block.argmax_C.tolist()
        committed, hit_eos = finalize_block(argmax, s)
        finished = hit_eos or slot.block + 1 >= slot.blocks
        result = CanvasResult(rid, slot.block, block.steps, res.accepted, res.mean_entropy, True, finished,
                              hit_eos, draft, tuple(committed))
        if not finished:
            slot.context.extend(argmax)  # the next block's commit pass encodes the raw argmax, as the reference
            slot.block, slot.denoiser, slot.soft_CD = slot.block + 1, None, None
        return result


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for it: on CUDA from pinned memory, non-blocking (a plain copy of
    pageable memory synchronises the stream)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _rows(out: VocabOut, rows: slice) -> VocabOut:
    """One canvas's rows of a fused pass over several."""
    return VocabOut(out.lse_C[rows], out.entropy_C[rows], out.argmax_C[rows], out.sample_C[rows],
                    out.soft_CD[rows] if out.soft_CD is not None else None)
