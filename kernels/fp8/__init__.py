"""FP8 (e4m3) expert matmuls: weights quantized per output channel, activations per token at run time.

- `quantize(t)`: [..., N, K] -> (float8_e4m3fn [..., N, K], float32 scales [..., N]); t ~ q * scale[..., None].
- `fp8_linear(x, w_q, w_scale)`: x [M, K] @ dequant(w)^T with x quantized per token: one expert's projection.
- `scaled_grouped_mm(x, w_q, w_scale, offs)`: every expert of a layer at once, rows sorted by expert with group
  ends `offs` on the device (the graph-safe form): `torch._scaled_grouped_mm` on sm90 GPUs, elsewhere the same
  math as a grouped GEMM over the FP8 values widened to float32 (exact products, float32 sums) scaled after.

The choice is by device, never by configuration. Scales are float32 and never rounded: the error is the two
roundings to e4m3 (../shared/ENVIRONMENT.md: about 6 % relative on random weights, cosine 0.998).
"""

from __future__ import annotations

import torch

from ..moe import grouped_mm

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_TINY = 1e-12  # an all-zero row gets scale TINY / 448 and quantizes to zeros

__all__ = ["FP8", "FP8_MAX", "fp8_linear", "quantize", "scaled_grouped_backend", "scaled_grouped_mm"]


def quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization over the last axis: (q [..., N, K] e4m3, scale [..., N] float32)."""
    tf = t.float()
    scale = tf.abs().amax(dim=-1).clamp(min=_TINY) / FP8_MAX
    q = (tf / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def fp8_linear(x_MK: torch.Tensor, w_NK: torch.Tensor, w_scale_N: torch.Tensor) -> torch.Tensor:
    """[M, N] in x's dtype: x quantized per token, times the FP8 weight, both scales applied after the sum."""
    x_q, x_s = quantize(x_MK)
    y = (x_q.float() @ w_NK.float().T) * x_s.unsqueeze(-1) * w_scale_N.unsqueeze(0)
    return y.to(x_MK.dtype)


def scaled_grouped_backend(device: torch.device) -> str:
    """'scaled' (torch._scaled_grouped_mm, sm90) or 'widened' (FP8 values as float32 in a grouped GEMM)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0):
        return "scaled"
    return "widened"


def scaled_grouped_mm(x_PK: torch.Tensor, w_ENK: torch.Tensor, w_scale_EN: torch.Tensor,
                      offs_E: torch.Tensor) -> torch.Tensor:
    """[P, N] in x's dtype for rows sorted by expert (`offs_E`: each expert's end, int32 on the device); rows past
    offs[-1] are padding (unset). Nothing is read back to the host."""
    x_q, x_s = quantize(x_PK)
    if scaled_grouped_backend(x_PK.device) == "scaled":
        out_dtype = x_PK.dtype if x_PK.dtype == torch.bfloat16 else torch.bfloat16
        y = torch._scaled_grouped_mm(x_q, w_ENK.transpose(-2, -1), scale_a=x_s, scale_b=w_scale_EN, offs=offs_E,
                                     out_dtype=out_dtype)
        return y.to(x_PK.dtype)
    y = grouped_mm(x_q.float(), w_ENK.float(), offs_E)
    row_expert = torch.searchsorted(offs_E.to(torch.int64), torch.arange(x_PK.shape[0], device=x_PK.device),
                                    right=True).clamp(max=w_ENK.shape[0] - 1)
    return (y * x_s.unsqueeze(-1) * w_scale_EN[row_expert]).to(x_PK.dtype)
