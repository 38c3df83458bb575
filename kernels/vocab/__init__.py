"""The fused vocabulary pass: `vocab_pass(h, embed, softcap, temperature, keys)` -> VocabOut (lse, entropy,
argmax, Gumbel-max sample, self-conditioning input), with no [rows, vocabulary] tensor. Triton on CUDA
(`triton_vocab.py`), the chunked torch reference elsewhere (`reference.py`); `kernels.dispatch` decides."""

from __future__ import annotations

import torch

from ..dispatch import use_triton
from .noise import row_keys
from .reference import VocabOut, vocab_pass_reference
from .sizes import REFERENCE_CHUNK, reference_workspace_bytes, triton_workspace_bytes

__all__ = ["VocabOut", "row_keys", "vocab_pass", "vocab_pass_reference", "workspace_bytes"]

def vocab_pass(h_RD: torch.Tensor, embed_VD: torch.Tensor, softcap: float, temperature_R: torch.Tensor,
               keys_R: torch.Tensor, soft: bool = True) -> VocabOut:
    if use_triton(h_RD.device):
        from .triton_vocab import vocab_pass_triton

        return vocab_pass_triton(h_RD, embed_VD, softcap, temperature_R, keys_R, soft)
    return vocab_pass_reference(h_RD, embed_VD, softcap, temperature_R, keys_R, soft, REFERENCE_CHUNK)


def workspace_bytes(rows: int, hidden: int, vocab: int, device: torch.device, soft: bool = True) -> int:
    """Scratch bytes of one `vocab_pass` over `rows` rows on `device` (Triton's or the torch path's)."""
    if use_triton(device):
        return triton_workspace_bytes(rows, hidden, soft)
    return reference_workspace_bytes(rows, hidden, vocab, soft)
