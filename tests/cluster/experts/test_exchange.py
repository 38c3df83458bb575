"""Dispatch and combine over a real gloo group of A attention + E expert processes: every attention rank's MoE
output is bitwise what `LocalExperts` (all experts in one process) gives for the same rows, in batches with
small and large (item, expert) groups, with zero rows on a rank, with every row on one expert, and with expert
ranks that receive nothing."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.multiprocessing as mp

from dgserve.cluster.experts import exchange
from dgserve.cluster.experts.partition import ExpertPartition
from dgserve.model.errors import ConfigError
from tests.readback import NoReadBack

NUM_EXPERTS, K, D, I, LAYERS = 8, 2, 64, 32, 2


def weights(seed: int = 0):
    from dgserve.model.moe import ExpertWeights

    g = torch.Generator().manual_seed(seed)
    return [ExpertWeights(torch.randn(NUM_EXPERTS, 2 * I, D, generator=g) / D ** 0.5,
                          torch.randn(NUM_EXPERTS, D, I, generator=g) / I ** 0.5) for _ in range(LAYERS)]


def case(kind: str, rank: int):
    """(rows [T, D], ids [T, K], weights [T, K], layout) of one attention rank for one case."""
    from dgserve.model.layers import RowLayout

    g = torch.Generator().manual_seed(100 * rank + hash(kind) % 97)
    sizes = {"mixed": [1, 3, 40, 2, 17], "empty": [] if rank == 1 else [5, 30], "one-expert": [4, 25],
             "first-rank-only": [2, 33, 1], "single": [3], "single-large": [30]}[kind]
    T = sum(sizes)
    rows = torch.randn(T, D, generator=g)
    if kind == "single":  # one item (no layout), every row on experts 2 and 3: small groups on every rank
        ids = torch.stack([torch.full((T,), 2), torch.full((T,), 3)], dim=-1)
    elif kind == "one-expert":
        ids = torch.stack([torch.full((T,), 5), torch.full((T,), 6)], dim=-1)
    elif kind == "first-rank-only":
        ids = torch.stack([torch.zeros(T, dtype=torch.long), torch.ones(T, dtype=torch.long)], dim=-1)
    else:
        ids = torch.rand(T, NUM_EXPERTS, generator=g).topk(K, dim=-1).indices
    w = torch.rand(T, K, generator=g)
    bounds = tuple(int(b) for b in torch.tensor([0, *sizes]).cumsum(0).tolist())
    return rows, ids, w, RowLayout(bounds) if len(sizes) > 1 else None


CASES = ("mixed", "empty", "one-expert", "first-rank-only", "single", "single-large")


def in_big_groups(ids, layout) -> torch.Tensor:
    """Tokens [T] whose every (item, expert) group has at least `min_rows` rows (any GEMM gives them the same bits)."""
    from dgserve.model.layers import RowLayout

    layout = layout or RowLayout((0, ids.shape[0]))
    item = torch.bucketize(torch.arange(ids.shape[0]), torch.tensor(layout.bounds[1:-1]), right=True)
    key = item.unsqueeze(-1) * NUM_EXPERTS + ids
    return (torch.bincount(key.reshape(-1))[key] >= layout.min_rows).all(dim=-1)


def worker(rank: int, world: int, attention: int, store: str, ranks_holding: dict | None,
           capacity: int = 0) -> None:
    from dgserve.cluster.experts.exchange import AllToAllExperts, ExpertServer, Roles
    from dgserve.cluster.experts.local import process_group
    from dgserve.model.moe import ExpertWeights, LocalExperts

    with process_group(rank, world, store):
        roles = Roles(attention, world - attention)
        part = (ExpertPartition.explicit(NUM_EXPERTS, ranks_holding) if ranks_holding
                else ExpertPartition.balanced(NUM_EXPERTS, roles.experts))
        every = weights()
        if capacity:  # the counts exchange is what the fixed mode leaves out
            exchange.exchange_counts = None
        if rank < attention:
            backend, alone = AllToAllExperts(part, roles), LocalExperts(every)
            backend.set_capacity(capacity)
            for kind in CASES:
                for layer in range(LAYERS):
                    rows, ids, w, layout = case(kind, rank)
                    with NoReadBack() if capacity else contextlib.nullcontext():
                        got = backend(layer, rows, ids, w, layout)
                    want = alone(layer, rows, ids, w, layout)
                    if capacity:  # bitwise where every group of a token is row-invariant; close elsewhere
                        big = in_big_groups(ids, layout)
                        assert torch.equal(got[big], want[big]), (kind, layer, rank)
                        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
                    else:
                        assert torch.equal(got, want), (kind, layer, rank, (got - want).abs().max())
                    seconds, sent = backend.take_stats()  # what the metrics see: rows per expert rank, per layer
                    owners = torch.tensor(part.owners)[ids.reshape(-1)]
                    assert sent == (tuple(torch.bincount(owners, minlength=roles.experts).tolist()),), (kind, sent)
                    assert seconds > 0
        else:
            mine = list(part.experts_of(rank - attention))
            server = ExpertServer([ExpertWeights(lw.gate_up[mine].clone(), lw.down[mine].clone()) for lw in every],
                                  roles, top_k=K)
            for _ in CASES:
                for layer in range(LAYERS):
                    with NoReadBack() if capacity else contextlib.nullcontext():
                        server.serve_layer(layer, D, torch.float32, capacity)


@pytest.mark.parametrize(("attention", "experts", "holding"), [(1, 2, None), (2, 2, None),
                                                               (1, 3, {0: [7], 1: [0, 1, 2, 3], 2: [4, 5, 6]})],
                         ids=["1+2", "2+2", "1+3-explicit"])  # 1+1 and 1+4: tests/cluster/experts/test_local.py
def test_the_split_gives_every_attention_rank_the_co_located_bits(attention, experts, holding, tmp_path):
    world = attention + experts
    mp.spawn(worker, args=(world, attention, str(tmp_path / "store"), holding), nprocs=world, join=True)


@pytest.mark.parametrize(("attention", "experts"), [(2, 2)], ids=["2+2"])
def test_a_fixed_capacity_exchange_reads_nothing_back_and_gives_the_co_located_bits(attention, experts, tmp_path):
    """Padded equal splits from the capacity alone: no counts exchange, no value brought to the host in the pass
    (on either side), and the same outputs as all experts in one process."""
    world = attention + experts
    mp.spawn(worker, args=(world, attention, str(tmp_path / "store"), None, 64), nprocs=world, join=True)


def test_a_balanced_partition_spreads_experts_evenly_and_an_explicit_one_is_checked():
    p = ExpertPartition.balanced(10, 4)
    assert [len(p.experts_of(j)) for j in range(4)] == [3, 3, 2, 2] and p.experts_of(0) == (0, 1, 2)
    assert p.local_index()[:4] == (0, 1, 2, 0)
    with pytest.raises(ConfigError, match="expert_ranks"):
        ExpertPartition.balanced(4, 5)
    with pytest.raises(ConfigError, match="each expert once"):
        ExpertPartition.explicit(4, {0: [0, 1], 1: [1, 2, 3]})
    with pytest.raises(ConfigError, match="on none"):
        ExpertPartition.explicit(4, {0: [0, 1], 1: [2]})
