"""Norms, rotary embeddings and the gated MLP, with the reference's numerics (MODEL_SPEC 3.1, 3.4).

Casts are explicit where the reference depends on them: norms run in float32 and cast back; RoPE tables are
float32 and cast to the activation dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import RopeSpec


@functools.cache
def small_m(threads: int) -> int:
    """Rows from which a CPU float32 GEMM computes each output row the same way whatever M is.

    Below it, oneDNN/MKL take other kernel paths (and, with several threads, split rows differently) whose sums
    round differently: with one thread the bound is 4 on the machines we measured, with two it is 12. It is
    measured once per thread count, on two shapes, so the engine stays batch-invariant on any CPU
    (tests/model/test_batch_invariance.py checks it against the model's own shapes).
    """
    g = torch.Generator().manual_seed(0)
    worst = 0
    for k, n in ((64, 96), (256, 512)):
        w, x = torch.randn(n, k, generator=g), torch.randn(160, k, generator=g)
        ref = F.linear(x, w)
        for m in range(1, 65):
            if not torch.equal(F.linear(x[:m], w), ref[:m]):
                worst = m
    return worst + 1


@functools.cache
def activation_rows_invariant(threads: int, width: int) -> bool:
    """Whether the GeGLU activation over [P, width] rows gives every row bitwise what it gives alone, at `threads`.

    torch splits a large elementwise op between threads at numel / threads, and the end of each thread's share runs
    the kernel's scalar tail, which rounds tanh differently from the vector body; a row then depends on where the
    split falls. With one thread, or two and widths that are multiples of 64 (the real checkpoint's 704 and 2112),
    every split falls on a whole vector step. Measured, like small_m, so the engine can say when batching is not
    bitwise (tests/model/test_batch_invariance.py).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(4097, 2 * width, generator=torch.Generator().manual_seed(0))
        gate, up = x.chunk(2, dim=-1)
        together = F.gelu(gate, approximate="tanh") * up
        return all(torch.equal(F.gelu(gate[i:i + 1], approximate="tanh") * up[i:i + 1], together[i:i + 1])
                   for i in range(x.shape[0]))
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True, slots=True)
class RowLayout:
    """How packed rows split into work items, so batched GEMMs give each item the rows it would get alone.

    `bounds` are the item offsets [0, n1, n1 + n2, ..., N]. With `exact`, rows of items smaller than `small_m`
    are recomputed in a GEMM of their own; every other row is already bitwise independent of the batch.
    """

    bounds: tuple[int, ...]
    exact: bool = True

    @property
    def min_rows(self) -> int:
        return small_m(torch.get_num_threads())

    @property
    def small_spans(self) -> list[slice]:
        if not self.exact or len(self.bounds) <= 2:
            return []
        m = self.min_rows
        return [slice(a, b) for a, b in zip(self.bounds, self.bounds[1:], strict=False) if 0 < b - a < m]


def linear(x: torch.Tensor, w: torch.Tensor, layout: RowLayout | None = None) -> torch.Tensor:
    """F.linear over packed rows; each small item's rows as if alone (see RowLayout)."""
    y = F.linear(x, w)
    if layout is not None:
        for span in layout.small_spans:
            y[span] = F.linear(x[span], w)
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x * (mean(x^2) + eps)^-0.5 [* w], in float32, cast back (weight used as-is, not 1 + w)."""
    xf = x.float()
    out = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        out = out * weight.float()
    return out.type_as(x)


def gated_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
              layout: RowLayout | None = None) -> torch.Tensor:
    """GeGLU: gelu_tanh(x G^T) * (x U^T) -> D^T."""
    return linear(F.gelu(linear(x, gate, layout), approximate="tanh") * linear(x, up, layout), down, layout)


def rope_inv_freq(spec: RopeSpec, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [d/2]. Proportional RoPE rotates the first `partial*d/2` pairs and passes the rest."""
    if spec.rope_type == "default":
        inv = 1.0 / (spec.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv
    angles = int(spec.partial_rotary_factor * head_dim // 2)
    inv = 1.0 / (spec.theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim))
    nope = head_dim // 2 - angles
    if nope > 0:
        inv = torch.cat((inv, torch.zeros(nope, dtype=torch.float32)))
    return inv / spec.factor


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin [T, 1, d] for absolute positions [T] (the extra axis broadcasts over heads)."""
    freqs = positions[:, None].float() * inv_freq.to(positions.device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, d] rotated with split-half pairing (j, j + d/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
