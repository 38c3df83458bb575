"""The prefix cache's index: which prompt prefixes an attention rank holds, for whom, and what they cost.

Entries are prompt-prefill states at chunk boundaries. Prompts are prefilled in chunks that start at multiples of
`prefill_chunk` (driver.py; a chunk never ends inside an image: chunks.py), so the chunks of a prompt form a
path in a tree: a node's key is the exact token tuple of one chunk (and the digests of the images in it), and an
entry at depth j holds the cache after the first j chunks. A request whose first j chunks
equal a stored path starts from that entry and prefills the rest with the very bounds it would have used anyway,
so its cache, and its tokens, are the same as without the cache. A prompt's last, shorter chunk is an entry too;
only the same prompt reaches it (a longer prompt has a whole chunk there).

Each tenant has its own tree: a lookup never walks another tenant's entries, so a hit cannot tell one client what
another sent.

Memory: full-attention layers share pages by reference (the executor holds the tensors; model/cache.py), so the
index counts each page once however many entries hold it: pages carry logical ids that follow the tensors (a
request that starts from an entry shares its whole pages and their ids; pages it writes get new ids). Sliding
layers' windows belong to one entry each. `bytes` is what the entries hold in all; the driver reserves it in the
rank's memory budget, and drops entries least recently used when a request needs the room.
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .budget import PREFIX, MemoryBudget, MemorySizes
from .chunks import PromptChunks
from .metrics import PrefixStats
from .plan import Prefix

if TYPE_CHECKING:
    from .driver import Request


@dataclass(eq=False)
class Node:
    parent: Node | None
    key: tuple  # this chunk's tokens, then its images' digests ((): a tenant's root)
    depth: int  # positions up to the end of this chunk
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)
    entry: Entry | None = None


@dataclass(eq=False)
class Entry:
    id: int
    node: Node
    tenant: str
    pages: tuple[int, ...]  # logical ids of the full layers' pages it holds
    ready: bool = False  # the executor confirmed it holds the state (a store is planned, then confirmed)

    @property
    def positions(self) -> int:
        return self.node.depth


class PrefixIndex:
    """One attention rank's entries."""

    def __init__(self, chunk: int, sizes: MemorySizes, ids: Iterator[int]):
        self.chunk, self.sizes, self._ids = chunk, sizes, ids
        self.roots: dict[str, Node] = {}
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self.page_refs: Counter = Counter()
        self.window_bytes = 0
        self.stats = PrefixStats()

    @property
    def bytes(self) -> int:
        return len(self.page_refs) * self.sizes.full_page_bytes + self.window_bytes

    def chunks(self, prompt: Sequence[int] | PromptChunks) -> PromptChunks:
        """A prompt's chunks (a text prompt given as its ids is split at multiples of the chunk size)."""
        return prompt if isinstance(prompt, PromptChunks) else PromptChunks.of(prompt, self.chunk)

    def lookup(self, tenant: str, prompt: Sequence[int] | PromptChunks) -> Entry | None:
        """The ready entry of `tenant` for the longest chunk path `prompt` starts with (`touch` it if used)."""
        node, best = self.roots.get(tenant), None
        if node is None:
            return None
        for key in self.chunks(prompt).keys:
            node = node.children.get(key)
            if node is None:
                break
            if node.entry is not None and node.entry.ready:
                best = node.entry
        return best

    def touch(self, e: Entry) -> None:
        """`e` was just used: it goes last in eviction order."""
        self.entries.move_to_end(e.id)

    def has(self, tenant: str, prompt: Sequence[int] | PromptChunks, positions: int) -> bool:
        node = self._node(tenant, prompt, positions, create=False)
        return node is not None and node.entry is not None

    def add(self, tenant: str, prompt: Sequence[int] | PromptChunks, positions: int,
            pages: tuple[int, ...]) -> Entry:
        """A new entry (not ready) for `prompt`'s first `positions` positions, a chunk boundary or its end."""
        node = self._node(tenant, prompt, positions, create=True)
        if node.entry is not None:
            raise ValueError(f"an entry for {positions} positions of this prompt exists already")
        e = Entry(next(self._ids), node, tenant, pages)
        node.entry = e
        self.entries[e.id] = e
        self.page_refs.update(pages)
        self.window_bytes += self.sizes.window_bytes(positions)
        return e

    def drop(self, e: Entry) -> None:
        if self.entries.pop(e.id, None) is None:
            return
        self.page_refs.subtract(e.pages)
        self.page_refs = +self.page_refs  # forget pages no entry holds
        self.window_bytes -= self.sizes.window_bytes(e.positions)
        node = e.node
        node.entry = None
        while node.parent is not None and node.entry is None and not node.children:  # prune empty branches
            del node.parent.children[node.key]
            node = node.parent
        if node.parent is None and not node.children:
            self.roots.pop(e.tenant, None)

    def oldest(self) -> Entry | None:
        """The least recently used entry."""
        return next(iter(self.entries.values()), None)

    def _node(self, tenant: str, prompt: Sequence[int] | PromptChunks, positions: int,
              create: bool) -> Node | None:
        chunks = self.chunks(prompt)
        if not chunks.is_end(positions):
            raise ValueError(f"{positions} is not a chunk boundary of a {chunks.length}-token prompt")
        node = self.roots.get(tenant)
        if node is None:
            if not create:
                return None
            node = self.roots[tenant] = Node(None, (), 0)
        for key, stop in chunks.until(positions):
            child = node.children.get(key)
            if child is None:
                if not create:
                    return None
                child = node.children[key] = Node(node, key, stop)
            node = child
        return node


class PrefixCache:
    """The driver's side of the prefix cache: an index per attention rank, its reservation in the rank's budget,
    and the prefix work of the plan being built (`take`). Disabled, it finds nothing and stores nothing."""

    def __init__(self, chunk: int, sizes: MemorySizes, budgets: list[MemoryBudget], enabled: bool = True):
        ids = itertools.count()  # entry ids, unique over the ranks (a plan's drops go to every rank)
        self.indexes = [PrefixIndex(chunk, sizes, ids) for _ in budgets] if enabled else []
        self.sizes, self.budgets = sizes, budgets
        self._page_ids = itertools.count()
        self._reuse: list[Prefix] = []
        self._drops: list[int] = []
        self._stores: list[Prefix] = []

    @property
    def enabled(self) -> bool:
        return bool(self.indexes)

    def lookup(self, rank: int, tenant: str, prompt: Sequence[int] | PromptChunks) -> Entry | None:
        return self.indexes[rank].lookup(tenant, prompt) if self.indexes else None

    def fit(self, rank: int, key: int, need: int, hit: Entry | None = None) -> bool:
        """Reserve `need` bytes for `key` on `rank`, dropping entries (least recently used first) if that makes it
        fit; none is dropped when it would not fit even without them. `hit`, the entry the request will start
        from, is marked used first (it goes last)."""
        if hit is not None:
            self.indexes[rank].touch(hit)
        budget = self.budgets[rank]
        if budget.try_set(key, need):
            return True
        if not self.indexes or budget.used - budget.held(key) - budget.held(PREFIX) + need > budget.capacity:
            return False
        while not budget.try_set(key, need):
            if not self.make_room(rank):
                return False
        return True

    def make_room(self, rank: int) -> bool:
        """Drop `rank`'s least recently used entry; False when it holds none."""
        index = self.indexes[rank] if self.indexes else None
        oldest = index.oldest() if index is not None else None
        if oldest is None:
            return False
        self._drop(rank, oldest)
        index.stats.evictions += 1
        return True

    def start(self, r: Request, hit: Entry | None) -> None:
        """r, admitted on r.rank, starts empty or from `hit` (its whole pages, and their ids, are shared)."""
        r.pages = []
        if r.cached_tokens is None:
            r.cached_tokens = hit.positions if hit is not None else 0
        if not self.indexes:
            return
        stats = self.indexes[r.rank].stats
        stats.lookups += 1
        if hit is not None:
            r.encoded = hit.positions
            r.pages = list(hit.pages[: hit.positions // self.sizes.page_size])
            self._reuse.append(Prefix(r.rid, hit.id, hit.positions))
            stats.hits += 1
            stats.tokens_reused += hit.positions

    def store(self, r: Request, stop: int) -> None:
        """Plan to keep r's state at `stop` (the end of a prefill chunk) as an entry, if its tenant has none there
        and the rank's budget has room for it (older entries make way; requests never do)."""
        index = self.indexes[r.rank]
        if index.has(r.tenant, r.chunks, stop):
            return
        while len(r.pages) < self.sizes.pages(stop):
            r.pages.append(next(self._page_ids))
        e = index.add(r.tenant, r.chunks, stop, tuple(r.pages[: self.sizes.pages(stop)]))
        while not self.budgets[r.rank].try_set(PREFIX, index.bytes):
            if index.oldest() is e:  # nothing older left to drop: no room for it
                index.drop(e)
                self.budgets[r.rank].try_set(PREFIX, index.bytes)
                return
            self.make_room(r.rank)
        self._stores.append(Prefix(r.rid, e.id, stop))

    def confirm(self, stores: tuple[Prefix, ...], stored: tuple[int, ...]) -> None:
        """Entries the executor stored become usable; the others are forgotten (and dropped there, if held)."""
        done = set(stored)
        for rank, index in enumerate(self.indexes):
            for s in stores:
                e = index.entries.get(s.entry)
                if e is None:
                    continue
                if s.entry in done:
                    e.ready = True
                    index.stats.stored += 1
                else:
                    self._drop(rank, e)

    def take(self) -> tuple[tuple[Prefix, ...], tuple[int, ...], tuple[Prefix, ...]]:
        """The plan's (reuse, drop, store), and a fresh start for the next plan's. An entry stored and dropped in
        the same plan is neither."""
        live = {e for index in self.indexes for e in index.entries}
        out = tuple(self._reuse), tuple(self._drops), tuple(s for s in self._stores if s.entry in live)
        self._reuse, self._drops, self._stores = [], [], []
        return out

    def stats(self) -> tuple[PrefixStats, int, int]:
        """The counters over all ranks, the entries held and the bytes they reserve."""
        total = PrefixStats()
        for index in self.indexes:
            total.add(index.stats)
        return total, sum(len(i.entries) for i in self.indexes), sum(i.bytes for i in self.indexes)

    def _drop(self, rank: int, e: Entry) -> None:
        index = self.indexes[rank]
        index.drop(e)
        self.budgets[rank].try_set(PREFIX, index.bytes)  # smaller: always fits
        self._drops.append(e.id)
