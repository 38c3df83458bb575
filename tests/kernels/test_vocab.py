"""The fused vocabulary pass: the chunked torch reference against the plain full-vocabulary computation; the
Triton kernel (under the interpreter, small shapes) against the reference; its samples against the probabilities
(chi-square); and the workspace of the real shapes."""

from __future__ import annotations

import pytest
import torch

from dgserve.kernels.vocab import row_keys, vocab_pass, vocab_pass_reference, workspace_bytes
from dgserve.kernels.vocab.noise import gumbel, uniform
from dgserve.kernels.vocab.sizes import triton_workspace_bytes

SOFTCAP = 30.0


def inputs(R: int = 40, V: int = 300, D: int = 48, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(R, D, generator=g).to(dtype)
    e = (torch.randn(V, D, generator=g) * 0.5).to(dtype)
    temp = torch.rand(R, generator=g) * 1.5 + 0.2
    return h, e, temp, row_keys(1234 + seed, R)


def full(h, e, temp, keys):
    """Everything over the whole vocabulary at once: the definitions."""
    z = torch.tanh((h @ e.T).float() / SOFTCAP) * SOFTCAP / temp.unsqueeze(-1)
    p = torch.softmax(z, dim=-1)
    lse = torch.logsumexp(z, dim=-1)
    cols = torch.arange(e.shape[0])
    return {"lse": lse, "entropy": -(p * torch.log_softmax(z, -1)).sum(-1), "argmax": z.argmax(-1),
            "sample": (z + gumbel(keys, cols)).argmax(-1), "soft": p @ e.float()}


def check(out, want, tol: float) -> None:
    torch.testing.assert_close(out.lse_C, want["lse"], rtol=tol, atol=tol)
    torch.testing.assert_close(out.entropy_C, want["entropy"], rtol=tol, atol=tol)
    torch.testing.assert_close(out.soft_CD, want["soft"], rtol=tol, atol=tol)
    assert torch.equal(out.argmax_C, want["argmax"])
    assert torch.equal(out.sample_C, want["sample"])


@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_the_chunked_reference_equals_the_full_vocabulary_definitions(chunk):
    h, e, temp, keys = inputs()
    check(vocab_pass_reference(h, e, SOFTCAP, temp, keys, chunk=chunk), full(h, e, temp, keys), 2e-5)


def test_the_triton_kernel_under_the_interpreter_equals_the_reference(monkeypatch):
    pytest.importorskip("triton")
    from dgserve.kernels.vocab.triton_vocab import vocab_pass_triton

    h, e, temp, keys = inputs(R=20, V=150, D=40)  # ragged against every block size: masks on rows, cols, D
    want = full(h, e, temp, keys)
    check(vocab_pass_triton(h, e, SOFTCAP, temp, keys), want, 2e-5)
    check(vocab_pass_triton(h, e, SOFTCAP, temp, keys, splits=16), want, 2e-5)  # splits with nothing to do
    monkeypatch.setenv("DGSERVE_KERNELS", "triton")  # the dispatcher picks it on CPU only when told to
    check(vocab_pass(h, e, SOFTCAP, temp, keys), want, 2e-5)


def test_in_bfloat16_the_kernel_rounds_as_its_reference_does():
    """16-bit weights: the logits rounded to bf16 as the LM head's GEMM returns them, the probabilities rounded to
    bf16 for the self-conditioning product; both paths do it, so they agree closely, and both sit within bf16
    rounding of the float32 definitions."""
    pytest.importorskip("triton")
    from dgserve.kernels.vocab.triton_vocab import vocab_pass_triton

    h, e, temp, keys = inputs(R=16, V=96, D=32, dtype=torch.bfloat16)
    got, ref = vocab_pass_triton(h, e, SOFTCAP, temp, keys), vocab_pass_reference(h, e, SOFTCAP, temp, keys, chunk=40)
    torch.testing.assert_close(got.lse_C, ref.lse_C, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.entropy_C, ref.entropy_C, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.soft_CD, ref.soft_CD, rtol=5e-3, atol=5e-3)  # p rounded per chunk
    assert torch.equal(got.argmax_C, ref.argmax_C) and torch.equal(got.sample_C, ref.sample_C)
    want = full(h.float(), e.float(), temp, keys)
    torch.testing.assert_close(got.lse_C, want["lse"], rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(got.soft_CD, want["soft"], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.slow)])  # interpreted: ~27 s
def test_samples_follow_the_probabilities_by_chi_square(impl, monkeypatch):
    """4,000 draws (one key each) from one row's distribution over 12 tokens: the chi-square statistic is under
    the 0.1 % critical value of 11 degrees of freedom (31.26); the draws are fixed by the keys, so this is
    deterministic. Draws that ignore the noise (argmax) or use it wrongly fail it by orders of magnitude."""
    if impl == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("DGSERVE_KERNELS", impl)
    n, V = 4000, 12
    g = torch.Generator().manual_seed(3)
    h, e = torch.randn(1, 8, generator=g).expand(n, 8).contiguous(), torch.randn(V, 8, generator=g)
    temp, keys = torch.ones(n), row_keys(99, n)
    out = vocab_pass(h, e, SOFTCAP, temp, keys, soft=False)
    p = torch.softmax(torch.tanh((h[0] @ e.T) / SOFTCAP) * SOFTCAP, dim=-1)
    observed = torch.bincount(out.sample_C, minlength=V).float()
    expected = p * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 31.26, (chi2, observed.tolist(), expected.tolist())


def test_the_noise_is_uniform_and_a_pure_function_of_key_and_column():
    keys, cols = row_keys(5, 64), torch.arange(1000)
    u = uniform(keys, cols)
    assert float(u.min()) > 0 and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    assert torch.equal(uniform(keys[10:20], cols[500:]), u[10:20, 500:])  # any chunking draws the same numbers
    assert not torch.equal(row_keys(5, 4), row_keys(6, 4))


def test_the_workspace_of_a_real_canvas_is_under_16_mb():
    """256 rows of hidden 2816 (the real model): the Triton kernel's split workspace and the torch path's chunk,
    against the 256 x 262,144 float32 probabilities (268 MB) a canvas keeps without the fused pass."""
    rows, hidden = 256, 2816
    assert triton_workspace_bytes(rows, hidden) <= 16 * 2**20
    assert workspace_bytes(rows, hidden, 262_144, torch.device("cpu")) <= 16 * 2**20
    assert rows * 262_144 * 4 > 16 * triton_workspace_bytes(rows, hidden)
