"""A model of any config with random weights made where it runs (the GPU check's real 26B-A4B model: 50 GB that
cannot be downloaded or written there), built by the loader's own readers so its tensors have exactly the
checkpoint's names, shapes and layout.

Values keep activations in range through 30 layers: matrices ~ N(0, 1/fan_in) (the embedding too, so that
embedding * sqrt(D) is about unit scale), vectors (norm weights, scalars) 1 + N(0, 0.05^2).
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .loader import read_experts, read_text_weights
from .moe import LocalExperts
from .transformer import DiffusionGemma
from .weights import TensorSpec


class RandomReader:
    """Stands in for a CheckpointReader: each tensor made at random on `device` from one seeded generator."""

    def __init__(self, device: str | torch.device, seed: int = 0, record: bool = False):
        """`record`: keep each tensor by its checkpoint name in `named` (which holds them alive)."""
        self.device, self.record = torch.device(device), record
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.bytes_made = 0
        self.named: dict[str, torch.Tensor] = {}  # checkpoint name -> the tensor made for it

    def read(self, spec: TensorSpec, dtype: torch.dtype, rows=None) -> torch.Tensor:
        shape = spec.shape if rows is None else (len(rows), *spec.shape[1:])
        t = torch.randn(shape, dtype=dtype, device=self.device, generator=self.generator)
        if len(shape) == 1:
            t.mul_(0.05).add_(1.0)
        else:
            t.mul_(shape[-1] ** -0.5)
        self.bytes_made += t.numel() * t.element_size()
        if self.record:
            self.named[spec.name] = t
        return t


def random_model(config: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu", seed: int = 0,
                 names: bool = False, experts_dtype: str = "auto"):
    """The text model of `config` with every expert local, random weights on `device` (experts quantized as they
    are made with experts_dtype "fp8"); with `names`, also each tensor by its checkpoint name (the same storage:
    another implementation can be given the same weights; FP8 experts are not in it)."""
    reader = RandomReader(device, seed, record=names)
    weights = read_text_weights(reader, config, dtype)
    ids = tuple(range(config.text.num_experts))
    experts = read_experts(reader, config, dtype, ids, experts_dtype)
    model = DiffusionGemma(config, weights, LocalExperts(experts, ids, config.text.num_experts))
    return (model, reader.named) if names else model
