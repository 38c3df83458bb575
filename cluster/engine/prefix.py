"""The prefix cache's index: which prompt prefixes an attention rank holds, for whom, and what they cost.

Entries are prompt-prefill states at chunk boundaries. Prompts are prefilled in chunks that start at multiples of
`prefill_chunk` (driver.py), so the chunks of a prompt form a path in a tree: a node's key is the exact token tuple
of one chunk, and an entry at depth j holds the cache after the first j chunks. A request whose first j chunks
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

from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .budget import MemorySizes


@dataclass(eq=False)
class Node:
    parent: Node | None
    key: tuple[int, ...]  # this chunk's tokens ((): a tenant's root)
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


@dataclass
class PrefixStats:
    lookups: int = 0  # requests admitted with caching on (each looked up once)
    hits: int = 0
    tokens_reused: int = 0  # prompt positions not encoded thanks to a hit
    stored: int = 0
    evictions: int = 0  # entries dropped for room

    def add(self, other: PrefixStats) -> None:
        for k in vars(self):
            setattr(self, k, getattr(self, k) + getattr(other, k))


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

    def chunks(self, prompt: Sequence[int]) -> Iterator[tuple[int, ...]]:
        for start in range(0, len(prompt), self.chunk):
            yield tuple(prompt[start:start + self.chunk])

    def lookup(self, tenant: str, prompt: Sequence[int]) -> Entry | None:
        """The ready entry of `tenant` for the longest chunk path `prompt` starts with (`touch` it if used)."""
        node, best = self.roots.get(tenant), None
        if node is None:
            return None
        for key in self.chunks(prompt):
            node = node.children.get(key)
            if node is None:
                break
            if node.entry is not None and node.entry.ready:
                best = node.entry
        return best

    def touch(self, e: Entry) -> None:
        """`e` was just used: it goes last in eviction order."""
        self.entries.move_to_end(e.id)

    def has(self, tenant: str, prompt: Sequence[int], positions: int) -> bool:
        node = self._node(tenant, prompt, positions, create=False)
        return node is not None and node.entry is not None

    def add(self, tenant: str, prompt: Sequence[int], positions: int, pages: tuple[int, ...]) -> Entry:
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

    def _node(self, tenant: str, prompt: Sequence[int], positions: int, create: bool) -> Node | None:
        if not 0 < positions <= len(prompt) or (positions % self.chunk and positions != len(prompt)):
            raise ValueError(f"{positions} is not a chunk boundary of a {len(prompt)}-token prompt")
        node = self.roots.get(tenant)
        if node is None:
            if not create:
                return None
            node = self.roots[tenant] = Node(None, (), 0)
        for key in self.chunks(prompt[:positions]):
            child = node.children.get(key)
            if child is None:
                if not create:
                    return None
                child = node.children[key] = Node(node, key, node.depth + len(key))
            node = child
        return node
