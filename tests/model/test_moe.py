"""The experts' graph-safe path (the GPU path, run here on CPU): one grouped GEMM per projection over offsets that
stay on the device, nothing read back to the host, and the exact path's outputs within float rounding."""

from __future__ import annotations

import pytest
import torch

from dgserve.model.moe import ExpertWeights, LocalExperts, expert_counts
from tests.readback import NoReadBack

E, K, D, I = 8, 2, 64, 32


def layer(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [ExpertWeights((torch.randn(E, 2 * I, D, generator=g) / D ** 0.5).to(dtype),
                          (torch.randn(E, D, I, generator=g) / I ** 0.5).to(dtype))]


def routed(T: int, kind: str, dtype=torch.float32):
    g = torch.Generator().manual_seed(T)
    rows = torch.randn(T, D, generator=g).to(dtype)
    if kind == "one-expert":  # every row on experts 5 and 6; the others get nothing
        ids = torch.tensor([5, 6]).expand(T, K).contiguous()
    else:
        ids = torch.rand(T, E, generator=g).topk(K, dim=-1).indices
    return rows, ids, torch.rand(T, K, generator=g)


@pytest.mark.parametrize(("T", "kind"), [(40, "random"), (3, "random"), (25, "one-expert"), (0, "random")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_graph_safe_path_reads_nothing_back_and_matches_the_exact_path(T, kind, dtype):
    rows, ids, w = routed(T, kind, dtype)
    exact = LocalExperts(layer(dtype), graph_safe=False)(0, rows, ids, w)
    with NoReadBack():
        safe = LocalExperts(layer(dtype), graph_safe=True)(0, rows, ids, w)
    assert safe.shape == exact.shape == (T, D) and safe.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(safe, exact, rtol=tol, atol=tol)


def test_the_exact_path_does_read_back_so_the_guard_is_meaningful():
    rows, ids, w = routed(40, "random")
    with pytest.raises(AssertionError, match="reads a tensor back"), NoReadBack():
        LocalExperts(layer(), graph_safe=False)(0, rows, ids, w)


def test_expert_counts_without_bincount():
    ids = torch.tensor([3, 0, 3, 7, 3])
    assert expert_counts(ids, 8).tolist() == [1, 0, 0, 3, 0, 0, 0, 1]
    assert expert_counts(torch.empty(0, dtype=torch.long), 4).tolist() == [0, 0, 0, 0]


def test_by_default_the_cpu_runs_the_exact_path_and_other_devices_the_graph_safe_one():
    rows, ids, w = routed(10, "random")
    with pytest.raises(AssertionError, match="reads a tensor back"), NoReadBack():
        LocalExperts(layer())(0, rows, ids, w)  # CPU: the exact path
    on_meta = LocalExperts([ExpertWeights(t.gate_up.to("meta"), t.down.to("meta")) for t in layer(torch.bfloat16)])
    with NoReadBack():  # any other device: graph-safe (the meta device runs shapes only, by CUDA's rules: bf16)
        out = on_meta(0, rows.to("meta", torch.bfloat16), ids.to("meta"), w.to("meta"))
    assert out.shape == (10, D) and out.device.type == "meta"
