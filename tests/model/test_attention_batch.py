"""Batched attention (the GPU path, run here on CPU): a pass's items in one kernel call per batch give each item
what the per-item path gives it (float rounding apart), with the sliding-window and causal rules, and nothing is
read back to the host."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dgserve.model.attention import AttnItem, batch_plans, item_attention
from dgserve.model.attention_batch import batches, run_batch, sdpa
from dgserve.model.cache import LayerKV
from dgserve.model.loader import load_checkpoint
from dgserve.model.moe import LocalExperts
from dgserve.model.transformer import WorkItem
from tests.readback import NoReadBack


@pytest.fixture(scope="module")
def model(tiny_dir):
    m = load_checkpoint(tiny_dir).model
    m.experts = LocalExperts(m.experts.layers, graph_safe=True)  # no read back from the experts either
    return m


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(seed))


def _pass(model):
    """Caches of several lengths around the sliding window (32) and a mixed pass: two requests' committed blocks,
    a prompt chunk longer than the window, a second chunk of the same prompt (a later wave), and four canvases."""
    W, C = model.cfg.sliding_window, model.config.canvas_length
    caches = [model.new_cache() for _ in range(5)]
    for cache, n in zip(caches, (3, 20, 70, 0, 45), strict=True):
        if n:
            model.forward([WorkItem(cache, _ids(n, n), encode=True)])
    items = [WorkItem(caches[0], _ids(C, 1), encode=True), WorkItem(caches[1], _ids(C, 2), encode=True),
             WorkItem(caches[3], _ids(W + 9, 3), encode=True), WorkItem(caches[3], _ids(5, 4), encode=True)]
    items += [WorkItem(caches[i], _ids(C, 10 + i), encode=False) for i in (0, 1, 2, 4)]
    return caches, items


def _run(model, batched: bool, caches, items):
    caches_copy = copy.deepcopy(caches)
    index = {id(c): i for i, c in enumerate(caches)}
    run_items = [WorkItem(caches_copy[index[id(it.cache)]], it.ids, it.encode, it.soft_CD) for it in items]
    model.batched_attention = batched
    try:
        return model.forward(run_items), caches_copy
    finally:
        model.batched_attention = False


def test_a_batched_pass_gives_every_item_what_the_per_item_path_gives(model):
    caches, items = _pass(model)
    alone, alone_caches = _run(model, False, caches, items)
    with NoReadBack():
        together, together_caches = _run(model, True, caches, items)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=2e-4)
    for a, b in zip(alone_caches, together_caches, strict=True):
        assert a.length == b.length
        for la, lb in zip(a.layers, b.layers, strict=True):
            torch.testing.assert_close(lb.keys, la.keys, rtol=1e-4, atol=2e-4)
            torch.testing.assert_close(lb.values, la.values, rtol=1e-4, atol=2e-4)


def test_a_layer_makes_one_kernel_call_per_batch_not_per_item(model, monkeypatch):
    caches, items = _pass(model)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(a[0].shape) or sdpa(*a, **k))
    _run(model, True, caches, items)
    # Per layer: wave 1 (three chunks), wave 2 (one chunk, the per-item kernel) and the four canvases.
    assert len(calls) == 3 * model.cfg.num_layers
    assert sorted(s[0] for s in calls[:3]) == [1, 3, 4]
    calls.clear()
    _run(model, False, caches, items)
    assert len(calls) == len(items) * model.cfg.num_layers


@pytest.mark.parametrize("keep_last", [None, 7], ids=["full", "sliding"])
def test_one_layer_in_bfloat16_batches_within_rounding(keep_last):
    """In bfloat16 (where batching is the default) one layer's attention, batched, is within bf16 rounding of the
    per-item kernel: caches of 3 to 40 keys, encoder items past the window and canvases."""
    g = torch.Generator().manual_seed(0)
    H, Kv, d, bf = 4, 2, 16, torch.bfloat16
    caches = []
    for n in (3, 40, 12, 0):
        cache = LayerKV(Kv, d, keep_last, bf, page_size=8)
        if n:
            cache.append(torch.randn(Kv, n, d, generator=g).to(bf), torch.randn(Kv, n, d, generator=g).to(bf))
        caches.append(cache)
    sizes = [(True, 9), (True, 20), (False, 16), (False, 16), (False, 16)]
    owners = [0, 3, 1, 2, 0]
    items, start = [], 0
    for (encode, n), o in zip(sizes, owners, strict=True):
        items.append(AttnItem(start, start + n, caches[o].length + (9 if o == 0 and not encode else 0), encode))
        start += n
    q, k, v = (torch.randn(heads, start, d, generator=g).to(bf) for heads in (H, Kv, Kv))
    layer_caches = [caches[o] for o in owners]
    outs = []
    for batched in (False, True):
        run_caches = copy.deepcopy(layer_caches) if not batched else layer_caches
        out = torch.full((start, H, d), float("nan"), dtype=bf)
        if batched:
            for plan in batch_plans(items, run_caches, keep_last and keep_last + 1, "cpu"):
                if isinstance(plan, int):
                    item_attention(items[plan], run_caches[plan], q, k, v, keep_last and keep_last + 1, out)
                else:
                    run_batch(plan, q, k, v, [run_caches[i] for i in plan.items], out)
        else:
            for it, c in zip(items, run_caches, strict=True):
                item_attention(it, c, q, k, v, keep_last and keep_last + 1, out)
        outs.append(out)
    assert not outs[1].isnan().any()
    torch.testing.assert_close(outs[1], outs[0], rtol=0.02, atol=0.02)


def test_batches_run_encoder_waves_before_canvases():
    assert batches([True, True, True, False, False], [1, 2, 1, 1, 3]) == [[0, 1], [2], [3, 4]]
    assert batches([False, False], [1, 2]) == [[0, 1]]
    with pytest.raises(ValueError, match="work item 1 encodes for a request whose canvas comes earlier"):
        batches([False, True], [7, 7])


@pytest.mark.parametrize("case", ["causal", "masked", "canvas"])
@pytest.mark.parametrize("kv", [1, 2, 4])
def test_folded_query_heads_give_what_grouped_heads_give(case, kv):
    """Off CPU the G query heads of a KV head go into the query length (so a mask reaches the memory-efficient
    kernel): the same attention as SDPA's grouped-query path."""
    g = torch.Generator().manual_seed(kv)
    B, H, T, d = 2, 4, 6, 8
    L = T if case == "causal" else 11
    q, k, v = torch.randn(B, H, T, d, generator=g), torch.randn(B, kv, L, d, generator=g), torch.randn(
        B, kv, L, d, generator=g)
    mask = None
    if case == "masked":  # per-query rows (an encoder item over cached keys)
        mask = torch.rand(B, 1, T, L, generator=g) > 0.3
        mask[..., 0] = True
    elif case == "canvas":
        mask = torch.arange(L)[None, None, None, :] < torch.tensor([7, 11])[:, None, None, None]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=case == "causal", scale=1.0,
                                          enable_gqa=True)
    got = sdpa(q, k, v, mask, causal=case == "causal", fold=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
