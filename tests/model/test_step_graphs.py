"""The decoder step as fixed-shape pieces (the CUDA-graph path; run eagerly here on CPU): n canvases padded to the
next captured count give each canvas what a plain pass gives it, and nothing in the step reads back to the host."""

from __future__ import annotations

import pytest
import torch

from dgserve.model.loader import load_checkpoint
from dgserve.model.moe import LocalExperts
from dgserve.model.step_graphs import DecoderGraphs
from dgserve.model.transformer import WorkItem
from tests.readback import NoReadBack


@pytest.fixture(scope="module")
def model(tiny_dir):
    m = load_checkpoint(tiny_dir).model
    m.experts = LocalExperts(m.experts.layers, graph_safe=True)
    m.batched_attention = True  # the GPU path's attention
    return m


def canvases(model, n: int, soft: bool) -> list[WorkItem]:
    C, D = model.config.canvas_length, model.cfg.hidden_size
    g = torch.Generator().manual_seed(n)
    items = []
    for i in range(n):
        cache = model.new_cache()
        model.forward([WorkItem(cache, torch.randint(3, 900, (5 + 17 * i,), generator=g), encode=True)])
        sc = torch.randn(C, D, generator=g) * 0.1 if soft and i % 2 == 0 else None
        items.append(WorkItem(cache, torch.randint(3, 900, (C,), generator=g), encode=False, soft_CD=sc))
    return items


@pytest.mark.parametrize(("n", "soft"), [(1, False), (3, True), (4, True)])
def test_a_padded_fixed_shape_step_gives_every_canvas_what_a_plain_pass_gives(model, n, soft):
    graphs = DecoderGraphs(model, buckets=(1, 2, 4), capture=False)
    items = canvases(model, n, soft)
    with NoReadBack():
        got = graphs.run(items)
    want = model.forward(items)
    assert got.shape == want.shape == (n * model.config.canvas_length, model.cfg.hidden_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert graphs.bucket_for(n) == {1: 1, 3: 4, 4: 4}[n]


def test_the_pieces_see_the_same_shapes_for_any_count_in_a_bucket(model, monkeypatch):
    graphs = DecoderGraphs(model, buckets=(4,), capture=False)
    rows = []
    piece = graphs._piece
    monkeypatch.setattr(graphs, "_piece", lambda j, n: rows.append(n) or piece(j, n))
    for n in (2, 3):
        graphs.run(canvases(model, n, False))
    assert set(rows) == {4 * model.config.canvas_length} and len(rows) == 2 * (model.cfg.num_layers + 1)


def test_every_count_shares_the_largest_counts_buffers(model):
    graphs = DecoderGraphs(model, buckets=(1, 2, 4), capture=False)
    assert graphs.buf.h.shape == (4 * model.config.canvas_length, model.cfg.hidden_size)
    one = graphs.run(canvases(model, 1, True))
    torch.testing.assert_close(one, model.forward(canvases(model, 1, True)), rtol=1e-5, atol=1e-5)


def test_what_the_graphs_do_not_take_is_refused_by_name(model):
    graphs = DecoderGraphs(model, buckets=(1, 2), capture=False)
    with pytest.raises(ValueError, match=r"take 1..2 canvases of 32 rows; got \[\(32, 'canvas'\), \(32"):
        graphs.run(canvases(model, 3, False))
    cache = model.new_cache()
    with pytest.raises(ValueError, match=r"got \[\(4, 'encode'\)\]"):
        graphs.run([WorkItem(cache, torch.arange(3, 7), encode=True)])
