"""The driver: request states, the scheduling policy, and one typed step plan per iteration.

Policy, per iteration:
1. Cancelled and expired requests end (their cache and canvas are released in this iteration's plan).
2. Admission is FIFO by bytes: paused requests first (oldest first), then the queue, while fewer than
   `max_running` requests are running and the head's reservation fits the memory budget. A head that does not
   fit waits (no skipping ahead, so a large request is never starved by small ones). With several attention
   ranks (each with its own memory and budget) a new request goes to the least loaded rank it fits on, and
   lives there until it ends.
3. Every running request with a canvas takes one denoise step; a request whose block just finished commits it
   (an encode item) in the same pass, right before the next block's first step. Prompts are prefilled in chunks
   of `prefill_chunk` tokens, oldest request first, at most `max_prefill_tokens` per iteration; the last chunk
   shares its pass with the first denoise step. Replayed encode passes (after a preemption) share that budget, so
   one iteration runs at most `EngineConfig.max_step_rows` token rows per attention rank.
4. Preemption: a commit needs its request's reservation to grow by one block of KV. If the budget is full, the
   newest running request is paused: its KV cache is dropped (its canvas, self-conditioning and generator are
   kept), and when it is admitted again its encode passes are replayed with the same bounds, which recomputes
   the very same cache (batching never changes an item's rows), so its tokens do not change.
5. Prefix cache (EngineConfig.prefix_cache; prefix.py): every prefill chunk's end is stored as an entry of the
   request's tenant on its rank when the rank's budget has room for it; a request admitted (or re-admitted after a
   pause) starts from its tenant's longest stored prefix and prefills only the rest, with the same chunk bounds.
   Entries are dropped least recently used whenever a request's admission or a commit needs their room, before
   anything waits or is paused for it. With several ranks, a new request goes to the rank holding its longest
   prefix if that rank has room (then the least loaded).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from dgserve.model.config import ModelConfig, num_blocks
from dgserve.model.sampler import SamplerSettings

from . import events as ev
from .budget import MemoryBudget, MemorySizes
from .chunks import PromptChunks
from .config import EngineConfig
from .errors import Code
from .plan import Admit, ItemKind, PlanItem, StepOutcome, StepPlan
from .prefix import Entry, PrefixCache


class State(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"
    DONE = "done"


@dataclass(eq=False)
class Request:
    rid: int
    request_id: str
    prompt_ids: tuple[int, ...]
    settings: SamplerSettings
    seed: int
    drafts: bool
    blocks: int
    stream: ev.RequestStream
    submitted_at: float
    deadline: float | None  # monotonic seconds
    state: State = State.WAITING
    order: int = -1  # admission order (preemption pauses the largest)
    rank: int = 0  # the attention rank holding its state
    admitted_at: float | None = None
    first_block_at: float | None = None
    encoded: int = 0  # positions held by the executor's cache
    context_len: int = 0  # prompt + committed blocks
    segments: list[tuple[int, int, ItemKind]] = field(default_factory=list)  # encode passes, for replay
    steps_per_block: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    preemptions: int = 0
    cancelled: bool = False
    in_executor: bool = False
    tenant: str = ""  # whose cached prefixes it may use and add to
    pages: list[int] = field(default_factory=list)  # logical ids of its cache's full-layer pages (prefix.py)
    cached_tokens: int | None = None  # prompt positions its first admission took from the prefix cache
    media: tuple = ()  # the images and video frames whose soft tokens the prompt holds (model.media.MediaItem)
    spans: tuple[tuple[int, int], ...] = ()  # [start, stop) of each one's soft tokens in the prompt
    chunks: PromptChunks | None = None  # its prefill chunks and their prefix-cache keys (set on enqueue)

    @property
    def image_tokens(self) -> int:
        """Soft tokens of its images and frames: the tower's rows it keeps while it runs."""
        return sum(m.soft_tokens for m in self.media)


@dataclass(frozen=True, slots=True)
class DriverCounts:
    waiting: int
    running: int
    paused: int
    preemptions: int  # over the requests not ended


class Driver:
    def __init__(self, config: ModelConfig, engine: EngineConfig, sizes: MemorySizes,
                 budgets: list[MemoryBudget], clock=time.monotonic):
        self.config, self.engine, self.sizes, self.budgets = config, engine, sizes, budgets
        self.clock = clock
        self.C = config.canvas_length
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order
        self.paused: list[Request] = []
        self.by_rid: dict[int, Request] = {}
        self.iteration = 0
        self._order = 0
        self._release: list[int] = []  # executor state to drop in the next plan
        self.prefix = PrefixCache(engine.prefill_chunk, sizes, budgets, engine.prefix_cache)

    # -- requests --------------------------------------------------------------------------------------------
    def max_positions(self, prompt_len: int, settings: SamplerSettings) -> int:
        """The most positions a request's cache ever holds (its last block is never encoded)."""
        return prompt_len + (num_blocks(settings.max_new_tokens, self.C) - 1) * self.C

    def max_bytes(self, prompt_len: int, settings: SamplerSettings, image_tokens: int = 0) -> int:
        """The budget a request needs to be sure to finish: its largest reservation, plus the canvases that
        paused requests keep while it runs alone (at most max_running - 1)."""
        return (self.sizes.request(self.max_positions(prompt_len, settings), image_tokens)
                + (self.engine.max_running - 1) * self.sizes.canvas_bytes)

    def enqueue(self, r: Request) -> None:
        r.context_len = len(r.prompt_ids)
        r.chunks = PromptChunks.of(r.prompt_ids, self.engine.prefill_chunk, r.spans, [m.digest for m in r.media])
        self.by_rid[r.rid] = r
        self.waiting.append(r)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        """Requests not ended, plus executor state still to release (it takes an iteration)."""
        return len(self.waiting) + len(self.running) + len(self.paused) + len(self._release)

    def counts(self) -> DriverCounts:
        """Queue, running and paused counts at this instant (the metrics after every iteration)."""
        return DriverCounts(len(self.waiting), len(self.running), len(self.paused),
                            sum(r.preemptions for r in list(self.by_rid.values())))

    def placements(self) -> list[tuple[str, int]]:
        """(request id, the attention rank holding it) per request, at this instant (other threads read this copy,
        never the live collections); ids are labels and may repeat."""
        return [(r.request_id, r.rank) for r in list(self.by_rid.values())]

    def cancel(self, stream: ev.RequestStream) -> None:
        """The request of `stream` ends with CANCELLED at the next plan (nothing if it already ended)."""
        for r in self.by_rid.values():
            if r.stream is stream:
                r.cancelled = True

    def fail_plan(self, plan: StepPlan, code: Code, message: str) -> None:
        """End every request the plan touched; the executor state they may hold is released by the next plan."""
        self.prefix.confirm(plan.store, ())
        for rid in {a.rid for a in plan.admit} | {it.rid for it in plan.items}:
            r = self.by_rid.get(rid)
            if r is not None:
                r.in_executor = True
                self._end(r, ev.Failed(code, message))

    def _end(self, r: Request, event: ev.Event) -> None:
        if r.in_executor:
            self._release.append(r.rid)
        self._drop(r)
        r.stream.push(event)

    def _drop(self, r: Request) -> None:
        for group in (self.running, self.paused):
            if r in group:
                group.remove(r)
        if r in self.waiting:
            self.waiting.remove(r)
        r.state, r.in_executor = State.DONE, False
        self.budgets[r.rank].free(r.rid)
        self.by_rid.pop(r.rid, None)

    def fail_all(self, code: Code, message: str) -> None:
        for r in list(self.by_rid.values()):
            self._end(r, ev.Failed(code, message))

    # -- one iteration ---------------------------------------------------------------------------------------
    def plan(self) -> StepPlan:
        self.iteration += 1
        self._expire()
        admit = self._admit()
        evict: list[int] = []
        items: list[PlanItem] = []
        prefill_left = self.engine.max_prefill_tokens
        for r in list(self.running):
            if r.state is not State.RUNNING:
                continue  # paused by an older request's growth earlier in this loop
            prefill_left = self._items_for(r, items, evict, prefill_left)
        if self.prefix.enabled:
            for it in items:
                if it.kind is ItemKind.PREFILL:
                    self.prefix.store(self.by_rid[it.rid], it.stop)
        release, self._release = tuple(self._release), []
        reuse, drop, store = self.prefix.take()
        return StepPlan(self.iteration, tuple(admit), tuple(evict), release, tuple(items), reuse, drop, store)

    def _expire(self) -> None:
        now = self.clock()
        for r in list(self.by_rid.values()):
            if r.cancelled:
                self._end(r, ev.Failed(Code.CANCELLED, f"request {r.request_id} was cancelled"))
            elif r.deadline is not None and now >= r.deadline:
                self._end(r, ev.Failed(Code.DEADLINE_EXCEEDED,
                                       f"request {r.request_id} passed its deadline after "
                                       f"{now - r.submitted_at:.3f}s ({len(r.steps_per_block)} blocks done)"))

    def _admit(self) -> list[Admit]:
        """Paused requests first (oldest first), then the queue in order; at most max_running per rank hold a
        canvas."""
        admits = []
        while self.paused or self.waiting:
            r = min(self.paused, key=lambda p: p.order) if self.paused else self.waiting[0]
            placed = self._place(r)
            if placed is None:
                break
            r.rank, hit = placed
            if r.state is State.PAUSED:
                self.paused.remove(r)
            else:
                self.waiting.popleft()
                r.order, self._order = self._order, self._order + 1
                r.admitted_at = self.clock()
                admits.append(Admit(r.rid, r.prompt_ids, r.settings, r.seed, r.drafts, r.rank, r.media, r.spans))
                r.in_executor = True
            self.prefix.start(r, hit)
            r.state = State.RUNNING
            self.running.append(r)
            self.running.sort(key=lambda q: q.order)
        return admits

    def _place(self, r: Request) -> tuple[int, Entry | None] | None:
        """The rank r is admitted on (its reservation made there) and the cached prefix it starts from there, or
        None if it must wait."""
        need = self.sizes.request(r.context_len, r.image_tokens)
        if r.state is State.PAUSED:  # its canvas lives on its rank
            if self._count(self.running, r.rank) >= self.engine.max_running:
                return None
            hit = self.prefix.lookup(r.rank, r.tenant, r.chunks)
            return (r.rank, hit) if self.prefix.fit(r.rank, r.rid, need, hit) else None
        hits = {k: self.prefix.lookup(k, r.tenant, r.chunks) for k in range(len(self.budgets))}
        ranks = sorted(range(len(self.budgets)), key=lambda k: (-(hits[k].positions if hits[k] else 0),
                                                                 self._holding(k), self.budgets[k].used))
        for k in ranks:
            if self._holding(k) < self.engine.max_running and self.prefix.fit(k, r.rid, need, hits[k]):
                return k, hits[k]
        return None

    @staticmethod
    def _count(group, rank: int) -> int:
        return sum(1 for q in group if q.rank == rank)

    def _holding(self, rank: int) -> int:
        return self._count(self.running, rank) + self._count(self.paused, rank)

    def _items_for(self, r: Request, items: list[PlanItem], evict: list[int], prefill_left: int) -> int:
        mine: list[PlanItem] = []
        pos, left = r.encoded, prefill_left
        while pos < r.context_len:
            start, stop, kind, counted = self._next_encode(r, pos, left)
            if stop <= start:
                items.extend(mine)  # out of encode budget this iteration; the context continues next time
                return left
            if kind is ItemKind.COMMIT and not self._grow(r, evict):
                return prefill_left  # r paused itself: none of its items run
            mine.append(PlanItem(r.rid, kind, start, stop))
            if counted:
                left -= stop - start
            pos = stop
        items.extend(mine)
        items.append(PlanItem(r.rid, ItemKind.DENOISE))
        return left

    def _next_encode(self, r: Request, pos: int, left: int) -> tuple[int, int, ItemKind, bool]:
        """The next encode pass from `pos` (start, stop, kind, whether it counts against this iteration's encode
        budget): a replayed one (same bounds as before), a prompt chunk, or the block just finished (its commit).

        Prompt chunks always start at multiples of prefill_chunk (or where an image's soft tokens end: chunks.py),
        so a prompt is split the same way under any load and its cache is the same alone or batched; a chunk that
        does not fit this iteration waits. Replays
        after a preemption count against the budget too (a request paused after 100 blocks replays its commits
        over several iterations, not in one); only a fresh commit does not (one per running canvas). An item
        runs when it fits what is left, or when nothing was used yet (a replayed commit larger than the budget
        still makes progress), so one iteration encodes at most max(max_prefill_tokens, canvas) budgeted rows.
        """
        def fits(n: int) -> bool:
            return n <= left or left == self.engine.max_prefill_tokens

        for start, stop, kind in r.segments:
            if start == pos:
                return (start, stop, kind, True) if fits(stop - start) else (0, 0, kind, True)
        if pos < len(r.prompt_ids):
            stop = r.chunks.end_of(pos)
            return (pos, stop, ItemKind.PREFILL, True) if fits(stop - pos) else (0, 0, ItemKind.PREFILL, True)
        return pos, r.context_len, ItemKind.COMMIT, False

    def _grow(self, r: Request, evict: list[int]) -> bool:
        need = self.sizes.request(r.context_len, r.image_tokens)
        while not self.budgets[r.rank].try_set(r.rid, need):
            if self.prefix.make_room(r.rank):  # cached prefixes make room before any request is paused
                continue
            victim = [q for q in self.running if q.rank == r.rank][-1]  # the newest running request on its rank
            self._pause(victim, evict)
            if victim is r:
                return False
        return True

    def _pause(self, r: Request, evict: list[int]) -> None:
        self.running.remove(r)
        r.state, r.encoded, r.preemptions, r.pages = State.PAUSED, 0, r.preemptions + 1, []
        self.budgets[r.rank].try_set(r.rid, self.sizes.request(0, r.image_tokens))  # its canvas and image rows
        # stay; its KV is dropped
        evict.append(r.rid)
        self.paused.append(r)

    # -- results ---------------------------------------------------------------------------------------------
    def apply(self, plan: StepPlan, outcome: StepOutcome) -> None:
        self.prefix.confirm(plan.store, outcome.stored)
        for f in outcome.failed:  # one request's own failure; the executor freed its state already
            r = self.by_rid.get(f.rid)
            if r is not None:
                r.in_executor = True  # released again by the next plan: a no-op there, it clears rank ownership
                self._end(r, ev.Failed(f.code, f"request {r.request_id}: {f.message}"))
        for it in plan.items:
            r = self.by_rid.get(it.rid)
            if r is None or it.kind is ItemKind.DENOISE:
                continue
            if (it.start, it.stop, it.kind) not in r.segments:
                r.segments.append((it.start, it.stop, it.kind))
            r.encoded = it.stop
        for c in outcome.canvases:
            r = self.by_rid.get(c.rid)
            if r is None:
                continue
            if c.draft is not None:
                r.stream.push(ev.Draft(c.block, c.step, c.draft))
            if c.block_done:
                self._block_done(r, c)

    def _block_done(self, r: Request, c) -> None:
        now = self.clock()
        r.steps_per_block.append(c.step)
        r.tokens.extend(c.committed)
        if r.first_block_at is None:
            r.first_block_at = now
        r.stream.push(ev.BlockCommitted(c.block, c.committed, c.step))
        if c.finished:
            r.in_executor = False  # the executor freed it already
            pad = r.settings.pad_token_id
            valid = sum(1 for t in r.tokens if pad is None or t != pad)
            passes = sum(r.steps_per_block)
            stats = ev.Stats(len(r.steps_per_block), tuple(r.steps_per_block), valid / passes if passes else 0.0,
                             r.first_block_at - r.submitted_at, now - r.submitted_at,
                             (r.admitted_at or now) - r.submitted_at, r.preemptions, r.cached_tokens or 0)
            self._drop(r)
            r.stream.push(ev.Finished(tuple(r.tokens), "eos" if c.hit_eos else "length", stats))
        else:
            r.context_len += self.C
