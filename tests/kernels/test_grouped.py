"""The Triton grouped GEMM (run by Triton's interpreter on CPU) against torch._grouped_mm: every expert of a layer
in one launch, the offsets on the device, any routing (experts with no rows, one expert with all of them, tiles
that straddle experts)."""

from __future__ import annotations

import pytest
import torch

from dgserve.kernels.moe import grouped_mm, grouped_mm_backend
from dgserve.kernels.moe.triton_grouped import grouped_mm_triton, tile_map
from tests.readback import NoReadBack

E, N, K = 6, 96, 80


def case(counts: list[int], dtype: torch.dtype, pad: int = 0):
    g = torch.Generator().manual_seed(sum(counts) + pad)
    P = sum(counts) + pad
    x = torch.randn(P, K, generator=g).to(dtype)
    w = (torch.randn(len(counts), N, K, generator=g) / K ** 0.5).to(dtype)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    return x, w, offs


ROUTINGS = {"spread": [70, 0, 5, 130, 1, 64], "one-expert": [0, 0, 200, 0, 0, 0], "empty": [0] * 6,
            "tiny": [1, 1, 1, 1, 1, 1]}


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_grouped_gemm_matches_torch_grouped_mm(routing, dtype):
    x, w, offs = case(ROUTINGS[routing], dtype, pad=7)  # 7 padding rows past the last expert's
    valid = int(offs[-1])
    out = torch.full((x.shape[0], N), float("nan"), dtype=dtype)
    got = grouped_mm_triton(x, w, offs, out)
    assert got.data_ptr() == out.data_ptr() and got[valid:].isnan().all()  # padding rows untouched
    got = got[:valid]
    want = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)[:valid]
    assert got.shape == want.shape and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # the interpreter truncates float32 -> bfloat16 where torch rounds: one bf16 step apart at most
        torch.testing.assert_close(got, want, rtol=2 ** -7, atol=2 ** -7)


def test_each_tile_gets_its_expert_and_first_row_on_the_device():
    offs = torch.tensor([70, 70, 75, 205], dtype=torch.int32)
    with NoReadBack():
        expert, row0 = tile_map(offs, 205, block_m=64)
    # expert 0: rows 0..69 in two tiles; expert 1: none; expert 2: 70..74; expert 3: 75..204 in three tiles
    assert expert.tolist()[:6] == [0, 0, 2, 3, 3, 3] and row0.tolist()[:6] == [0, 64, 70, 75, 139, 203]
    assert expert.shape[0] == 4 + 4 and set(expert.tolist()[6:]) == {4}  # spare tiles exit at once


def test_dispatch_picks_triton_when_asked_and_torch_on_cpu_by_default(monkeypatch):
    x, w, offs = case(ROUTINGS["spread"], torch.float32)
    monkeypatch.delenv("DGSERVE_KERNELS", raising=False)
    assert grouped_mm_backend(x.device, x.dtype) == "torch"
    monkeypatch.setenv("DGSERVE_KERNELS", "triton")
    assert grouped_mm_backend(x.device, x.dtype) == "triton"
    torch.testing.assert_close(grouped_mm(x, w, offs), torch._grouped_mm(x, w.transpose(-2, -1), offs=offs),
                               rtol=1e-5, atol=1e-5)


def test_mismatched_shapes_are_refused_by_name():
    x, w, offs = case(ROUTINGS["spread"], torch.float32)
    with pytest.raises(ValueError, match=r"grouped_mm: x \(270, 80\), w \(6, 96, 81\)"):
        grouped_mm_triton(x, torch.zeros(6, 96, 81), offs)
