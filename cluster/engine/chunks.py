"""A prompt's prefill chunks: where each ends, and the key the prefix cache files it under.

Chunks start at multiples of `prefill_chunk`, except that a chunk never ends inside an image's (or video frame's)
soft tokens: those see each other both ways, so one pass holds them whole. A chunk that would ends where they
start, and the next holds them (all of them, if they are more than `prefill_chunk`); chunks then go on in whole
steps from there. The bounds depend on the prompt alone, so a prompt is split the same way under any load. A
chunk's key is its token tuple and, when it holds soft tokens, the digests of their images: two prompts with the
same placeholders and other pictures never share a cached prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dgserve.model.media import chunk_bounds


@dataclass(frozen=True)
class PromptChunks:
    bounds: tuple[tuple[int, int], ...]  # [start, stop) of each chunk, in order, covering the prompt
    keys: tuple[tuple, ...]  # the prefix cache's key of each chunk

    @classmethod
    def of(cls, prompt: Sequence[int], chunk: int, spans: Sequence[tuple[int, int]] = (),
           digests: Sequence[str] = ()) -> PromptChunks:
        """`spans`: [start, stop) of each image's soft tokens, `digests` each image's (same order)."""
        bounds = tuple(chunk_bounds(len(prompt), chunk, spans))
        keys = []
        for a, b in bounds:
            inside = tuple(d for (s, e), d in zip(spans, digests, strict=True) if a <= s and e <= b)
            keys.append(tuple(prompt[a:b]) + inside)
        return cls(bounds, tuple(keys))

    @property
    def length(self) -> int:
        return self.bounds[-1][1] if self.bounds else 0

    def end_of(self, start: int) -> int:
        """The end of the chunk that starts at `start` (a chunk boundary)."""
        for a, b in self.bounds:
            if a == start:
                return b
        raise ValueError(f"{start} is not where a chunk of this {self.length}-token prompt starts")

    def is_end(self, positions: int) -> bool:
        return any(b == positions for _, b in self.bounds)

    def until(self, positions: int) -> list[tuple[tuple, int]]:
        """(key, stop) of the chunks that end at or before `positions`."""
        return [(k, b) for k, (_, b) in zip(self.keys, self.bounds, strict=True) if b <= positions]
