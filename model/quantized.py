"""Checkpoints already quantized with compressed-tensors (what llm-compressor's FP8_DYNAMIC writes, and what vLLM
reads): their `quantization_config` and compression go through the `compressed-tensors` library.

Supported: FP8 (e4m3) weights with per-channel (or per-tensor) scales and dynamic per-token FP8 activations, in
the `float-quantized` (or `naive-quantized`) format. Routed experts in the per-expert layout that current
llm-compressor writes and compressed-tensors' MoE helpers name (`...experts.{e}.{gate,up,down}_proj.weight`
and `.weight_scale`, a scale per output channel): they load as they are, as dgserve's FP8 experts. Any other
quantized tensor (an FP8 attention or dense-MLP projection, when the checkpoint quantized it) is dequantized at
load to the weights' dtype by the library's compressor: dgserve runs FP8 for the experts only. Refused, naming
what was found: other schemes (NVFP4 and other 4-bit, block or group scales, integer, static activation
scales), other formats, fused FP8 expert tensors, and any quantization tensor the loader does not consume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import CheckpointError

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
VISION = ("vision_tower", "embed_vision")  # not loaded by the text model (whatever their quantization)
FORMATS = ("float-quantized", "naive-quantized")
# Tensors of other schemes: their presence means a scheme this loader would silently misread.
FOREIGN_PARAMS = ("input_scale", "weight_zero_point", "input_zero_point", "weight_packed", "weight_global_scale",
                  "input_global_scale", "weight_shape", "output_scale", "k_scale", "v_scale", "weight_g_idx")


def describe(scheme) -> str:
    """A scheme in a few words: weights and activations (what an error names)."""
    def args(a) -> str:
        if a is None:
            return "none"
        extra = f" block {a.block_structure}" if a.block_structure else f" group {a.group_size}" if a.group_size else ""
        return f"{a.num_bits}-bit {a.type} {a.strategy}{extra}{' dynamic' if a.dynamic else ''}"

    return f"weights {args(scheme.weights)}, activations {args(scheme.input_activations)}"


def _supported(scheme) -> bool:
    w, a = scheme.weights, scheme.input_activations
    weights_ok = (w is not None and w.type == "float" and w.num_bits == 8 and w.symmetric
                  and w.strategy in ("channel", "tensor"))
    acts_ok = a is not None and a.type == "float" and a.num_bits == 8 and a.dynamic is True and a.strategy == "token"
    return weights_ok and acts_ok


@dataclass(frozen=True)
class Quantization:
    """A checkpoint's compressed-tensors quantization_config, checked: one FP8_DYNAMIC-like scheme."""

    config: object  # compressed_tensors.QuantizationConfig
    scheme: object  # its (every group's) QuantizationScheme

    @classmethod
    def from_config(cls, raw: dict) -> Quantization | None:
        q = raw.get("quantization_config") or raw.get("text_config", {}).get("quantization_config")
        if q is None:
            return None
        from compressed_tensors import QuantizationConfig
        from pydantic import ValidationError

        if q.get("quant_method") != "compressed-tensors":
            raise CheckpointError(f"config.json quantization_config: quant_method {q.get('quant_method')!r} is not "
                                  "read; dgserve reads compressed-tensors checkpoints (FP8 dynamic)")
        try:
            config = QuantizationConfig.model_validate(q)
        except (ValidationError, ValueError) as e:
            raise CheckpointError(f"config.json quantization_config is not a valid compressed-tensors config: "
                                  f"{e}") from e
        if config.format not in FORMATS:
            raise CheckpointError(f"config.json quantization_config: format {config.format!r} is not supported "
                                  f"(supported: {' | '.join(FORMATS)}: FP8 weights with per-channel scales)")
        schemes = list(config.config_groups.items())
        for name, scheme in schemes:
            if not _supported(scheme):
                raise CheckpointError(f"quantization scheme {name!r} ({describe(scheme)}) is not supported: dgserve "
                                      "reads FP8 e4m3 weights with per-channel or per-tensor scales and dynamic "
                                      "per-token FP8 activations (FP8_DYNAMIC); NVFP4 and other 4-bit, block or "
                                      "group scales, integer and static-activation schemes are refused")
        if not schemes:
            raise CheckpointError("config.json quantization_config has no config_groups")
        return cls(config, schemes[0][1])

    def dequantize(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """A quantized non-expert weight back to float, by the library's compressor."""
        from compressed_tensors.compressors import BaseCompressor

        compressor = BaseCompressor.get_value_from_registry(self.config.format)
        return compressor.decompress({"weight": weight, "weight_scale": scale}, self.scheme)["weight"]


def expert_names(layer_prefix: str, expert: int, proj: str) -> tuple[str, str]:
    """The weight and scale names of one expert's projection in the per-expert layout."""
    base = f"{layer_prefix}.experts.{expert}.{proj}"
    return f"{base}.weight", f"{base}.weight_scale"


def channel_scale(scale: torch.Tensor, channels: int, name: str) -> torch.Tensor:
    """A stored scale ([N, 1], [N] or a per-tensor [1] / []) as float32 [N]."""
    flat = scale.float().reshape(-1)
    if flat.numel() == 1:
        return flat.expand(channels).contiguous()
    if flat.numel() != channels:
        raise CheckpointError(f"tensor {name}: {flat.numel()} scales for {channels} output channels")
    return flat


def check_consumed(names, consumed: set[str], all_read: bool = True) -> None:
    """Refuse quantization tensors of other schemes and, when the whole text model was read (`all_read`; an expert
    rank reads only its experts), a weight scale of no weight the model has."""
    for name in sorted(names):
        param = name.rsplit(".", 1)[-1]
        if param in FOREIGN_PARAMS:
            raise CheckpointError(f"unexpected tensor {name} ({param}): a quantization scheme dgserve does not read "
                                  "(it reads FP8 weights with weight_scale and dynamic activations only)")
        if (all_read and param == "weight_scale" and ".experts." not in name and name not in consumed
                and not any(v in name for v in VISION)):
            raise CheckpointError(f"unexpected tensor {name}: a scale for a weight the model does not have")
