"""A tiny checkpoint already quantized to FP8, as llm-compressor's FP8_DYNAMIC writes one (make-tiny
--experts-dtype fp8), through the compressed-tensors library: its scheme preset, its qparams and its compressor.

The routed experts are written in the per-expert layout (`...experts.{e}.{gate,up,down}_proj.weight` in
float8_e4m3fn and `.weight_scale` [out, 1] float32); with `dense`, every layer's dense MLP projections are
quantized too (checkpoints that quantize every Linear), which the loader dequantizes. The rest stays as written.
"""

from __future__ import annotations

import torch

from .weights import DECODER

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _scheme(targets: list[str]):
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import FP8_DYNAMIC

    return QuantizationScheme(targets=targets, **FP8_DYNAMIC)


def _compress(weight: torch.Tensor, scheme) -> dict[str, torch.Tensor]:
    """{weight: FP8, weight_scale: [out, 1] float32} by the library's qparams and compressor."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    w = weight.float()
    scale, _ = calculate_qparams(w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True), scheme.weights)
    compressor = BaseCompressor.get_value_from_registry("float-quantized")
    out = compressor.compress({"weight": w, "weight_scale": scale.float()}, scheme)
    return {"weight": out["weight"].contiguous(), "weight_scale": out["weight_scale"].float().contiguous()}


def quantize_checkpoint(tensors: dict[str, torch.Tensor], num_layers: int, dense: bool = False) -> dict:
    """Rewrites `tensors` in place (fused experts -> per-expert FP8; with `dense`, the dense MLP in FP8) and
    returns the config.json `quantization_config`."""
    from compressed_tensors import QuantizationConfig

    targets = [r"re:.*\.experts\.\d+\.(gate|up|down)_proj$"] + ([r"re:.*\.mlp\.(gate|up|down)_proj$"] if dense else [])
    scheme = _scheme(targets)
    for i in range(num_layers):
        pre = f"{DECODER}.layers.{i}"
        gate_up, down = tensors.pop(f"{pre}.experts.gate_up_proj"), tensors.pop(f"{pre}.experts.down_proj")
        I = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            for proj, w in zip(PROJECTIONS, (gate_up[e, :I], gate_up[e, I:], down[e]), strict=True):
                for param, t in _compress(w, scheme).items():
                    tensors[f"{pre}.experts.{e}.{proj}.{param}"] = t
        if dense:
            for proj in PROJECTIONS:
                name = f"{pre}.mlp.{proj}"
                for param, t in _compress(tensors.pop(f"{name}.weight"), scheme).items():
                    tensors[f"{name}.{param}"] = t
    config = QuantizationConfig(config_groups={"group_0": scheme}, format="float-quantized",
                                quantization_status="compressed", ignore=["lm_head", "re:.*vision.*"])
    return config.model_dump(mode="json")
