"""The step plan: what one engine iteration runs, as a plain typed message.

The driver builds one plan per iteration; the executor (in step 3, every rank's executor) runs it. A plan holds
no model objects, only ids, positions and settings, so it can be pickled and broadcast to rank processes as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from dgserve.model.sampler import SamplerSettings

from .errors import Code


class ItemKind(StrEnum):
    PREFILL = "prefill"  # causal pass over prompt positions [start, stop): writes KV
    COMMIT = "commit"  # causal pass over the last committed block: writes KV
    DENOISE = "denoise"  # one denoise step of the request's current canvas: reads KV


@dataclass(frozen=True, slots=True)
class Admit:
    """A new request: the executor creates its state (context, generator, cache)."""

    rid: int
    prompt_ids: tuple[int, ...]
    settings: SamplerSettings
    seed: int
    drafts: bool = False
    rank: int = 0  # the attention rank that holds the request
    media: tuple = ()  # images and video frames (model.media.MediaItem: numpy patches), in prompt order
    spans: tuple[tuple[int, int], ...] = ()  # [start, stop) of each one's soft tokens in the prompt


@dataclass(frozen=True, slots=True)
class Prefix:
    """A cached prompt prefix and a request: `Reuse` starts the request's cache from the entry (positions
    [0, positions) encoded); `Store` keeps the request's cache state at `positions` as the entry, after the pass."""

    rid: int
    entry: int
    positions: int


@dataclass(frozen=True, slots=True)
class PlanItem:
    rid: int
    kind: ItemKind
    start: int = 0  # encode items: context positions [start, stop)
    stop: int = 0


@dataclass(frozen=True, slots=True)
class StepPlan:
    iteration: int
    admit: tuple[Admit, ...] = ()
    evict: tuple[int, ...] = ()  # drop the KV cache only (preempted; recomputed later by replaying its encodes)
    release: tuple[int, ...] = ()  # drop everything (finished elsewhere, cancelled, expired)
    items: tuple[PlanItem, ...] = ()  # in pass order: a request's encode item precedes its denoise item
    # The prefix cache, in this order: caches started from entries (after `admit`), entries dropped (before the
    # pass), entries stored from the pass's prefill chunks (after it)
    reuse: tuple[Prefix, ...] = ()
    drop: tuple[int, ...] = ()
    store: tuple[Prefix, ...] = ()
    # With expert ranks: this iteration runs one pass whose every MoE layer is an exchange with the expert ranks,
    # so an attention rank joins it even with no items of its own (zero rows). Set per rank by the group.
    exchange: bool = False
    # With a fixed-capacity exchange: the most token rows any attention rank runs in this pass, rounded up to a
    # power-of-two number of canvases; every layer's split sizes follow from it (0: variable splits).
    capacity: int = 0

    @property
    def empty(self) -> bool:
        return not (self.admit or self.evict or self.release or self.items or self.drop)


@dataclass(frozen=True, slots=True)
class CanvasResult:
    """What a denoise step yields for one canvas (never the logits)."""

    rid: int
    block: int
    step: int  # steps taken in this block so far
    accepted: int
    mean_entropy: float
    block_done: bool
    finished: bool  # the request ended with this block (EOS or its last block); its state is already freed
    hit_eos: bool = False
    draft: tuple[int, ...] | None = None  # argmax canvas, when drafts were asked for
    committed: tuple[int, ...] | None = None  # the block's tokens (padded after EOS), when block_done


@dataclass(frozen=True, slots=True)
class ItemFailure:
    """One request that failed in this iteration (its state is already freed); the others went on."""

    rid: int
    code: Code  # RESOURCE_EXHAUSTED (out of memory for this request: retriable) or INTERNAL
    message: str


@dataclass(frozen=True, slots=True)
class StepOutcome:
    iteration: int
    canvases: tuple[CanvasResult, ...]
    rows: dict[str, int] = field(default_factory=dict)  # token rows per ItemKind in the pass
    forward_s: float = 0.0
    sampling_s: float = 0.0
    kv_bytes: int = 0  # bytes held by the executor's caches after the step
    failed: tuple[ItemFailure, ...] = ()
    passes: int = 1  # forward passes run (more than one when a failed pass was split to find its culprit)
    # With expert ranks: seconds in the exchanges (the expert ranks' compute included), and the rows sent to each
    # expert rank, per layer
    exchange_s: float = 0.0
    expert_rows: tuple[tuple[int, ...], ...] = ()
    stored: tuple[int, ...] = ()  # prefix entries the plan asked to store that now exist
    prefix_bytes: int = 0  # bytes the executor's prefix entries hold (tensors not held by a request included)
    images: int = 0  # images and video frames the vision tower encoded in this step
    vision_s: float = 0.0  # seconds in the vision tower
