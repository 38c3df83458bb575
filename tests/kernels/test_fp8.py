"""FP8 expert matmuls (kernels/fp8): per-channel weight scales, per-token activation scales, the grouped form that
keeps its offsets on the device, against full precision and against torch._scaled_mm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dgserve.kernels.fp8 import FP8, fp8_linear, quantize, scaled_grouped_backend, scaled_grouped_mm
from dgserve.kernels.moe import grouped_mm
from tests.readback import NoReadBack


def test_quantize_is_per_row_and_round_trips_within_e4m3():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 40, 64, generator=g) * torch.rand(3, 40, 1, generator=g) * 10
    w[1, 7] = 0.0  # an all-zero channel quantizes to zeros, not NaN
    q, s = quantize(w)
    assert q.dtype == FP8 and q.shape == w.shape and s.shape == (3, 40) and s.dtype == torch.float32
    back = q.float() * s[..., None]
    assert back[1, 7].abs().max() == 0 and not back.isnan().any()
    assert ((back - w).abs() <= w.abs().amax(-1, keepdim=True) / 16 + 1e-6).all()  # e4m3: 3 mantissa bits
    assert (q.float().abs().amax(-1)[s > 1e-9] == 448).all()  # each channel uses the full range


def test_fp8_linear_is_the_scaled_mm_torch_runs_on_cpu():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(9, 64, generator=g), torch.randn(48, 64, generator=g) / 8
    w_q, w_s = quantize(w)
    x_q, x_s = quantize(x)
    want = torch._scaled_mm(x_q, w_q.T, scale_a=x_s[:, None], scale_b=w_s[None, :], out_dtype=torch.float32)
    torch.testing.assert_close(fp8_linear(x, w_q, w_s), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_grouped_form_equals_one_projection_per_expert_and_stays_close_to_full_precision(dtype):
    g = torch.Generator().manual_seed(2)
    E, N, K = 5, 96, 128
    counts = [30, 0, 7, 41, 1]
    x = torch.randn(sum(counts) + 3, K, generator=g).to(dtype)  # 3 padding rows
    w = (torch.randn(E, N, K, generator=g) / K ** 0.5).to(dtype)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    w_q, w_s = quantize(w)
    with NoReadBack():
        got = scaled_grouped_mm(x, w_q, w_s, offs)
    assert got.dtype == dtype
    valid, start, per_expert = int(offs[-1]), 0, []
    for e, n in enumerate(counts):
        per_expert.append(fp8_linear(x[start:start + n], w_q[e], w_s[e]))
        start += n
    torch.testing.assert_close(got[:valid], torch.cat(per_expert), rtol=0, atol=0)
    full = grouped_mm(x.float(), w.float(), offs)[:valid]
    rel = ((got[:valid].float() - full).norm() / full.norm()).item()
    cos = F.cosine_similarity(got[:valid].float().flatten(), full.flatten(), dim=0).item()
    assert rel < 8e-2 and cos > 0.995, (rel, cos)
    assert scaled_grouped_backend(x.device) == "widened"
