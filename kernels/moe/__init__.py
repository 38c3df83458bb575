"""Grouped expert GEMMs: `grouped_mm(x [P, K], w [E, N, K], offs [E])` -> [P, N], where rows offs[e-1]..offs[e]-1
(sorted by expert) are multiplied by w[e]^T, in one call for all experts with the offsets on the device (no host
synchronisation: a CUDA graph can hold it). `torch._grouped_mm` where it runs (CPU; bfloat16 on sm90),
the Triton kernel (`triton_grouped.py`) on other CUDA GPUs and dtypes; `kernels.dispatch` decides."""

from __future__ import annotations

import torch

from ..dispatch import choice, use_triton

__all__ = ["grouped_mm", "grouped_mm_backend"]


def grouped_mm_backend(device: torch.device, dtype: torch.dtype) -> str:
    """'torch' (torch._grouped_mm), 'triton', or 'loop' (a GEMM per expert: reads the counts back; only on a GPU
    without Triton, for the dtypes torch._grouped_mm refuses there)."""
    if device.type == "cuda":
        # torch._grouped_mm's bf16 kernels are built for sm90 (H100/H200); elsewhere Triton
        native = dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) == (9, 0)
        if use_triton(device) and not (native and choice() == "auto"):
            return "triton"
        return "torch" if native else "loop"
    return "triton" if use_triton(device) else "torch"


def grouped_mm(x_PK: torch.Tensor, w_ENK: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """[P, N] in x's dtype; rows past offs[-1] are left unset (padding)."""
    backend = grouped_mm_backend(x_PK.device, x_PK.dtype)
    if backend == "triton":
        from .triton_grouped import grouped_mm_triton

        return grouped_mm_triton(x_PK, w_ENK, offs_E)
    if backend == "loop":
        out = x_PK.new_empty(x_PK.shape[0], w_ENK.shape[1])
        start = 0
        for e, end in enumerate(offs_E.tolist()):
            if end > start:
                out[start:end] = x_PK[start:end] @ w_ENK[e].T
            start = end
        return out
    return torch._grouped_mm(x_PK, w_ENK.transpose(-2, -1), offs=offs_E)

