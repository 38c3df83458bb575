"""The fused vocabulary pass in plain torch, online over vocabulary chunks (the Triton kernel's reference).

For each canvas row r with final hidden state h_r, the tied embedding E [V, D], softcap c and temperature T_r:
    z_rv = c * tanh((h_r . E_v) / c) / T_r                       (tempered, softcapped logits, float32)
    lse_r = log sum_v exp(z_rv);  p_rv = exp(z_rv - lse_r)
    entropy_r = lse_r - sum_v p_rv z_rv;  argmax_r = argmax_v z_rv
    sample_r = argmax_v (z_rv + g_rv)    (Gumbel-max: a draw from p_r; g from the counter-based noise)
    soft_r = sum_v p_rv E_v              (self-conditioning input before its MLP: attention over the vocabulary)
Chunk by chunk, keeping a running max, sum, sum of e*z, best logit and best noisy logit, and the rescaled soft
accumulator, exactly as flash attention keeps its softmax over keys: at most [C, chunk] logits exist at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .noise import gumbel


@dataclass(frozen=True)
class VocabOut:
    lse_C: torch.Tensor  # float32
    entropy_C: torch.Tensor  # float32, nats
    argmax_C: torch.Tensor  # int64
    sample_C: torch.Tensor  # int64, Gumbel-max draw from softmax(z)
    soft_CD: torch.Tensor | None  # float32 softmax(z) @ E, when asked


def tempered_logits(h_CD: torch.Tensor, embed_VD: torch.Tensor, softcap: float,
                    temperature_C: torch.Tensor) -> torch.Tensor:
    """z [C, V] float32 for the rows of `embed_VD` given (a chunk of the vocabulary)."""
    logits = (h_CD @ embed_VD.T).float()
    return torch.tanh(logits / softcap) * softcap / temperature_C.float().unsqueeze(-1)


def vocab_pass_reference(h_CD: torch.Tensor, embed_VD: torch.Tensor, softcap: float, temperature_C: torch.Tensor,
                         keys_C: torch.Tensor, soft: bool = True, chunk: int = 8192) -> VocabOut:
    C, V = h_CD.shape[0], embed_VD.shape[0]
    dev = h_CD.device
    m = torch.full((C,), float("-inf"), device=dev)
    s, sz = torch.zeros(C, device=dev), torch.zeros(C, device=dev)
    best, best_i = torch.full((C,), float("-inf"), device=dev), torch.zeros(C, dtype=torch.long, device=dev)
    noisy, noisy_i = best.clone(), best_i.clone()
    acc = torch.zeros(C, embed_VD.shape[1], device=dev) if soft else None
    for v0 in range(0, V, chunk):
        e_chunk = embed_VD[v0:v0 + chunk]
        z = tempered_logits(h_CD, e_chunk, softcap, temperature_C)
        cols = torch.arange(v0, v0 + z.shape[1], device=dev)
        best, best_i = _running_argmax(z, v0, best, best_i)
        noisy, noisy_i = _running_argmax(z + gumbel(keys_C, cols), v0, noisy, noisy_i)
        m_new = torch.maximum(m, z.max(dim=-1).values)
        alpha = torch.exp(m - m_new)  # exp(-inf) = 0 on the first chunk
        e = torch.exp(z - m_new.unsqueeze(-1))
        s = s * alpha + e.sum(-1)
        sz = sz * alpha + (e * z).sum(-1)
        if acc is not None:  # e in the embedding's dtype, as soft_embedding rounds the probabilities
            acc = acc * alpha.unsqueeze(-1) + e.to(e_chunk.dtype).float() @ e_chunk.float()
        m = m_new
    lse = m + torch.log(s)
    return VocabOut(lse, lse - sz / s, best_i, noisy_i, acc / s.unsqueeze(-1) if acc is not None else None)


def _running_argmax(z: torch.Tensor, v0: int, best: torch.Tensor,
                    best_i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first index of the largest value so far (a later chunk wins only if strictly larger)."""
    cm, ci = z.max(dim=-1)
    better = cm > best
    return torch.where(better, cm, best), torch.where(better, ci + v0, best_i)
