"""The fused vocabulary pass compiled for the GPU (skipped without CUDA): the Triton kernel against the torch
reference at a larger size than the interpreter can run, in float32 and bfloat16, its draws by chi-square, and the
engine choosing it on CUDA."""

from __future__ import annotations

import pytest
import torch

from dgserve.kernels.vocab import row_keys, vocab_pass, vocab_pass_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_on_cuda_matches_the_reference(dtype):
    g = torch.Generator().manual_seed(0)
    R, V, D = 512, 32_768, 256
    h, e = torch.randn(R, D, generator=g), torch.randn(V, D, generator=g) * 0.1
    temp, keys = torch.rand(R, generator=g) + 0.3, row_keys(11, R)
    ref = vocab_pass_reference(h.to(dtype).float(), e.to(dtype).float(), 30.0, temp, keys)
    got = vocab_pass(h.to(dtype).cuda(), e.to(dtype).cuda(), 30.0, temp.cuda(), keys.cuda())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.lse_C.cpu(), ref.lse_C, rtol=tol, atol=tol)
    torch.testing.assert_close(got.entropy_C.cpu(), ref.entropy_C, rtol=tol, atol=tol)
    torch.testing.assert_close(got.soft_CD.cpu(), ref.soft_CD, rtol=tol, atol=tol)
    assert (got.argmax_C.cpu() == ref.argmax_C).float().mean() >= (1.0 if dtype == torch.float32 else 0.95)
    assert (got.sample_C.cpu() == ref.sample_C).float().mean() >= (1.0 if dtype == torch.float32 else 0.95)


def test_draws_on_cuda_follow_the_probabilities_by_chi_square():
    n, V = 20_000, 12
    g = torch.Generator().manual_seed(3)
    h, e = torch.randn(1, 16, generator=g).expand(n, 16).contiguous(), torch.randn(V, 16, generator=g)
    out = vocab_pass(h.cuda(), e.cuda(), 30.0, torch.ones(n, device="cuda"), row_keys(99, n, "cuda"), soft=False)
    p = torch.softmax(torch.tanh((h[0] @ e.T) / 30.0) * 30.0, dim=-1)
    observed = torch.bincount(out.sample_C.cpu(), minlength=V).float()
    chi2 = float(((observed - p * n) ** 2 / (p * n)).sum())
    assert chi2 < 31.26, chi2  # the 0.1 % critical value at 11 degrees of freedom
