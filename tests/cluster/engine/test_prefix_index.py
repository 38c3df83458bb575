"""The prefix cache's index (cluster/engine/prefix.py): chunk paths per tenant, least-recently-used order, and
bytes that count a shared page once."""

from __future__ import annotations

import itertools

import pytest
import torch

from dgserve.cluster.engine.budget import MemorySizes
from dgserve.cluster.engine.prefix import PrefixIndex

CHUNK = 4


@pytest.fixture
def index(tiny):
    sizes = MemorySizes(tiny.config, torch.float32, page_size=4)
    return PrefixIndex(CHUNK, sizes, itertools.count())


def ready(index, tenant, prompt, positions, pages):
    e = index.add(tenant, prompt, positions, pages)
    e.ready = True
    return e


def test_the_longest_ready_chunk_path_wins_within_a_tenant(index):
    p = list(range(10, 20))  # chunks [10..13] [14..17] [18, 19]
    one = ready(index, "a", p, 4, (0,))
    two = ready(index, "a", p, 8, (0, 1))
    assert index.lookup("a", p) is two
    assert index.lookup("a", p[:8] + [99]) is two and index.lookup("a", p[:4] + [99] * 4) is one
    assert index.lookup("a", [99] + p) is None
    assert index.lookup("b", p) is None  # another tenant sees nothing
    whole = ready(index, "a", p, 10, (0, 1, 2))  # the short last chunk: only the same prompt reaches it
    assert index.lookup("a", p) is whole and index.lookup("a", p + [7]) is two
    pending = index.add("a", p + [1, 2], 12, (0, 1, 2))  # not confirmed by the executor yet: never a hit
    assert not pending.ready and index.lookup("a", p + [1, 2]) is two


def test_boundaries_are_chunk_ends_or_the_prompt_end(index):
    with pytest.raises(ValueError, match="not a chunk boundary"):
        index.add("a", list(range(10)), 5, ())
    ready(index, "a", list(range(10)), 4, (0,))
    with pytest.raises(ValueError, match="exists already"):
        index.add("a", list(range(10)), 4, (0,))


def test_a_page_held_by_several_entries_counts_once(index):
    s = index.sizes
    p = list(range(16))
    a = ready(index, "a", p, 4, (0,))
    b = ready(index, "a", p, 8, (0, 1))
    assert index.bytes == 2 * s.full_page_bytes + s.window_bytes(4) + s.window_bytes(8)
    index.drop(a)
    assert index.bytes == 2 * s.full_page_bytes + s.window_bytes(8)
    index.drop(b)
    assert index.bytes == 0 and not index.roots  # empty branches are pruned


def test_least_recently_used_goes_first_and_a_touch_saves_an_entry(index):
    entries = [ready(index, "a", [t] * 4, 4, (t,)) for t in range(3)]
    assert index.oldest() is entries[0]
    index.touch(entries[0])
    assert index.oldest() is entries[1]
    index.drop(entries[1])
    assert index.oldest() is entries[2]
