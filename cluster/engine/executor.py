"""The executor: runs a step plan as one packed forward, then samples next to the logits.

It owns everything with tensors in it: the model, every request's KV cache, context tokens, generator, noise
stream and block denoiser. It never decides anything; the driver's plan says what to run. Token rows of all
work items go through the dense MLP and the experts as one batch per layer (model.forward); a canvas's logits
live only while its step is sampled, one canvas at a time, and only its self-conditioning embedding [C, D] is
kept for the next step.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from dgserve.model.config import num_blocks
from dgserve.model.sampler import BlockDenoiser, NoiseStream, finalize_block
from dgserve.model.transformer import DiffusionGemma, WorkItem

from .plan import Admit, CanvasResult, ItemKind, PlanItem, StepOutcome, StepPlan


class StepExecutor(Protocol):
    """What runs the engine's plans: this process's Executor, or rank 0's GroupExecutor over a unit's ranks."""

    def run(self, plan: StepPlan) -> StepOutcome:
        """Run one plan; raises UnitFailure when the unit cannot go on, anything else fails the plan only."""
        ...

    def heartbeat(self, iteration: int) -> None:
        """An empty iteration while idle (a group finds a rank that died meanwhile)."""
        ...

    def stop(self) -> None:
        """Release the other ranks (the engine is stopping cleanly)."""
        ...

    def close(self) -> None:
        """Free this process's threads."""
        ...


class PlanError(RuntimeError):
    """The plan does not match the executor's state (a driver bug, never a user error)."""


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


class Executor:
    """`sampler_threads` > 1 spreads the per-canvas work after the layers (LM head, sampling step,
    self-conditioning embedding) over that many threads: every canvas has its own generator and state, so
    canvases are independent, and torch releases the GIL inside each op. It is the CPU's share of batching:
    one canvas alone has nothing to overlap."""

    def __init__(self, model: DiffusionGemma, page_size: int, prefetch_noise: bool = True,
                 sampler_threads: int = 1):
        self.model, self.page_size, self.prefetch_noise = model, page_size, prefetch_noise
        self.slots: dict[int, Slot] = {}
        self.sampler_threads = sampler_threads
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
        return sum(s.cache.nbytes() for s in self.slots.values() if s.cache is not None)

    def _admit(self, a: Admit) -> None:
        cfg = self.model.config
        gen = torch.Generator(device=self.model.device).manual_seed(a.seed)
        self.slots[a.rid] = Slot(a, list(a.prompt_ids),
                                 NoiseStream(gen, cfg.canvas_length, cfg.text.vocab_size, self.prefetch_noise),
                                 a.settings.temperatures(), num_blocks(a.settings.max_new_tokens, cfg.canvas_length))

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> StepOutcome:
        for rid in plan.release:  # frees first, so a failure further on cannot leak them
            self.slots.pop(rid, None)
        for rid in plan.evict:
            if rid in self.slots:
                self.slots[rid].cache = None
        for a in plan.admit:
            self._admit(a)
        if not plan.items:
            return StepOutcome(plan.iteration, (), kv_bytes=self.kv_bytes())
        t0 = time.perf_counter()
        work, rows = self._work_items(plan.items)
        hidden = self.model.forward(work)
        forward_s = time.perf_counter() - t0
        canvases, sampling_s, logits_s = self._sample(plan.items, work, hidden)
        return StepOutcome(plan.iteration, tuple(canvases), rows, forward_s + logits_s, sampling_s, self.kv_bytes())

    def _work_items(self, items: tuple[PlanItem, ...]) -> tuple[list[WorkItem], dict[str, int]]:
        work, rows = [], {k.value: 0 for k in ItemKind}
        next_pos: dict[int, int] = {}
        for it in items:
            slot = self.slots.get(it.rid)
            if slot is None:
                raise PlanError(f"plan item for unknown request {it.rid}")
            if slot.cache is None:
                slot.cache = self.model.new_cache(self.page_size)
            if it.kind is ItemKind.DENOISE:
                if slot.denoiser is None:
                    slot.denoiser = BlockDenoiser(slot.admit.settings, slot.noise, slot.temps)
                work.append(WorkItem(slot.cache, slot.denoiser.canvas_C, encode=False, soft_CD=slot.soft_CD))
                rows[it.kind.value] += slot.denoiser.canvas_C.shape[0]
                continue
            expect = next_pos.get(it.rid, slot.cache.length)
            if it.start != expect or not expect < it.stop <= len(slot.context):
                raise PlanError(f"request {it.rid}: {it.kind} [{it.start}, {it.stop}) but the cache is at {expect} "
                                f"of {len(slot.context)} context positions")
            next_pos[it.rid] = it.stop
            ids = torch.tensor(slot.context[it.start:it.stop], dtype=torch.long, device=self.model.device)
            work.append(WorkItem(slot.cache, ids, encode=True))
            rows[it.kind.value] += it.stop - it.start
        return work, rows

    def _sample(self, items, work, hidden) -> tuple[list[CanvasResult], float, float]:
        canvases, row = [], 0
        for it, w in zip(items, work, strict=True):
            n = w.ids.shape[0]
            if it.kind is ItemKind.DENOISE:
                canvases.append((it.rid, slice(row, row + n)))
            row += n
        groups = self._groups(len(canvases))
        if len(groups) == 1:
            parts = [self._sample_group(canvases, hidden)]
        else:
            futures = [self._pool.submit(self._sample_group, canvases[g], hidden) for g in groups[1:]]
            parts = [self._sample_group(canvases[groups[0]], hidden)] + [f.result() for f in futures]
        out = [r for part in parts for r in part[0]]
        for r in out:
            if r.finished:
                del self.slots[r.rid]
        # Wall time of the sampling phase, split as the threads spent it.
        busy = [part[1] + part[2] for part in parts]
        scale = max(busy) / sum(busy) if sum(busy) else 0.0
        return out, scale * sum(p[1] for p in parts), scale * sum(p[2] for p in parts)

    def _groups(self, n: int) -> list[slice]:
        k = min(self.sampler_threads, n) if self._pool is not None else 1
        if k <= 1:
            return [slice(0, n)]
        bounds = [round(i * n / k) for i in range(k + 1)]
        return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]

    def _sample_group(self, canvases, hidden) -> tuple[list[CanvasResult], float, float]:
        out, sampling_s, logits_s = [], 0.0, 0.0
        with torch.inference_mode():
            for rid, span in canvases:
                t0 = time.perf_counter()
                logits_CV = self.model.logits(hidden[span])
                t1 = time.perf_counter()
                out.append(self._step(rid, logits_CV))
                sampling_s += time.perf_counter() - t1
                logits_s += t1 - t0
        return out, sampling_s, logits_s

    def _step(self, rid: int, logits_CV: torch.Tensor) -> CanvasResult:
        slot = self.slots[rid]
        block, s = slot.denoiser, slot.admit.settings
        res = block.step(logits_CV, self.model.dtype)
        draft = tuple(res.argmax_C.tolist()) if slot.admit.drafts else None
        if not block.done:
            # Keep the [C, D] embedding the next step needs, not the [C, V] probabilities.
            slot.soft_CD = self.model.soft_embedding(block.soft_source_CV)
            block.soft_source_CV = None
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
