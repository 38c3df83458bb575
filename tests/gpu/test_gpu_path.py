"""The GPU path on a GPU (skipped without CUDA): the Triton grouped GEMM against a GEMM per expert, the experts'
graph-safe path and the batched attention without a host synchronisation (CUDA's sync debug mode raises on one),
and a batched pass against the per-item one."""

from __future__ import annotations

import pytest
import torch

from dgserve.model.loader import load_checkpoint
from dgserve.model.moe import ExpertWeights, LocalExperts, group_rows
from dgserve.model.transformer import WorkItem

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_grouped_gemm_on_cuda_matches_a_gemm_per_expert(dtype):
    # imported here: a Triton kernel module imported at collection, before tests/kernels' conftest asks for the
    # interpreter, would be compiled for a GPU in a CPU-only run
    from dgserve.kernels.moe import grouped_mm
    from dgserve.kernels.moe.triton_grouped import grouped_mm_triton

    g = torch.Generator("cuda").manual_seed(0)
    E, D, N, P = 128, 512, 256, 4096
    ids = torch.randint(0, E, (P,), device="cuda", generator=g)
    order, offs = group_rows(ids, E)
    x = torch.randn(P, D, device="cuda", generator=g).to(dtype)
    w = (torch.randn(E, N, D, device="cuda", generator=g) / D ** 0.5).to(dtype)
    ref = torch.empty(P, N, device="cuda", dtype=dtype)
    start = 0
    for e, end in enumerate(offs.tolist()):
        ref[start:end] = (x[start:end].double() @ w[e].double().T).to(dtype)
        start = end
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(grouped_mm_triton(x, w, offs), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(grouped_mm(x, w, offs), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_experts_run_without_a_host_sync(dtype):
    g = torch.Generator("cuda").manual_seed(0)
    E, K, D, I, T = 16, 4, 256, 128, 300
    layer = [ExpertWeights((torch.randn(E, 2 * I, D, device="cuda", generator=g) / D ** 0.5).to(dtype),
                           (torch.randn(E, D, I, device="cuda", generator=g) / I ** 0.5).to(dtype))]
    rows = torch.randn(T, D, device="cuda", generator=g).to(dtype)
    ids = torch.rand(T, E, device="cuda", generator=g).topk(K, -1).indices
    w = torch.rand(T, K, device="cuda", generator=g)
    experts = LocalExperts(layer)
    experts(0, rows, ids, w)  # warm-up: Triton compiles (a sync) on the first call
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = experts(0, rows, ids, w)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    exact = LocalExperts([ExpertWeights(t.gate_up.cpu().float(), t.down.cpu().float()) for t in layer],
                         graph_safe=False)(0, rows.cpu().float(), ids.cpu(), w.cpu())
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.cpu().float(), exact, rtol=tol, atol=tol)


def canvases(m, n: int) -> list[WorkItem]:
    """n canvases over caches of 5, 15, 25 ... encoded positions."""
    caches = [m.new_cache() for _ in range(n)]
    for i, cache in enumerate(caches):
        m.forward([WorkItem(cache, torch.arange(3, 3 + 10 * i + 5, device="cuda"), encode=True)])
    return [WorkItem(c, torch.arange(100 + i, 132 + i, device="cuda"), encode=False) for i, c in enumerate(caches)]


def without_sync(fn):
    """fn() once to warm up, then again under CUDA's sync debug mode "error" (a host sync raises)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_batched_pass_on_cuda_matches_the_per_item_pass_and_does_not_sync(tiny_dir):
    m = load_checkpoint(tiny_dir, dtype="float32", device="cuda").model
    assert m.batched_attention
    items = canvases(m, 4)
    together = without_sync(lambda: m.forward(items))
    m.batched_attention = False
    alone = m.forward(items)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_captured_step_graphs_replay_what_the_pieces_compute_without_a_sync(tiny_dir, dtype):
    from dgserve.model.step_graphs import DecoderGraphs

    m = load_checkpoint(tiny_dir, dtype=dtype, device="cuda").model
    graphs, eager = DecoderGraphs(m, buckets=(1, 2, 4)), DecoderGraphs(m, buckets=(4,), capture=False)
    assert graphs.captured and not eager.captured
    items = canvases(m, 3)
    replayed = without_sync(lambda: graphs.run(items))
    tol = 1e-5 if dtype == "float32" else 2e-2
    torch.testing.assert_close(replayed, eager.run(items), rtol=tol, atol=tol)
    torch.testing.assert_close(replayed, m.forward(items), rtol=tol * 10, atol=tol * 10)


def test_fp8_experts_on_sm90_run_scaled_grouped_mm_as_the_widened_path_computes():
    from dgserve.kernels.fp8 import quantize, scaled_grouped_backend, scaled_grouped_mm
    from dgserve.kernels.moe import grouped_mm

    if scaled_grouped_backend(torch.device("cuda")) != "scaled":
        pytest.skip("torch._scaled_grouped_mm runs on sm90")
    g = torch.Generator("cuda").manual_seed(0)
    E, N, K, P = 16, 256, 512, 2048
    _, offs = group_rows(torch.randint(0, E, (P,), device="cuda", generator=g), E)
    x = torch.randn(P, K, device="cuda", generator=g).bfloat16()
    w_q, w_s = quantize((torch.randn(E, N, K, device="cuda", generator=g) / K ** 0.5).bfloat16())
    x_q, x_s = quantize(x)
    row_expert = torch.searchsorted(offs.long(), torch.arange(P, device="cuda"), right=True)
    want = grouped_mm(x_q.float(), w_q.float(), offs) * x_s[:, None] * w_s[row_expert]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = scaled_grouped_mm(x, w_q, w_s, offs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
