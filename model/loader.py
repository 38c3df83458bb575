"""Checkpoint loading: a local folder or a hub id, sharded safetensors read lazily, tensor by tensor.

A filter chooses which routed experts this process holds (all, some, none), and expert tensors are read as
row ranges of the stored [E, ...] tensors, so a process never holds the whole checkpoint in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig, load_generation_defaults, load_model_config
from .dtypes import AUTO, EXPERTS_DTYPES, resolve_dtype
from .errors import CheckpointError, ConfigError
from .hub import resolve_checkpoint
from .moe import ExpertWeights, LocalExperts
from .quantized import PROJECTIONS, Quantization, channel_scale, check_consumed, expert_names
from .sampler import SamplerSettings
from .transformer import DiffusionGemma
from .vision import VisionTower, read_vision_weights
from .weights import LayerWeights, TensorSpec, TextWeights, expert_specs, global_specs, layer_specs

# float64 is for verification: it separates logic errors from float32 rounding in tests.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_dtype(name: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype name (or `auto`: bfloat16 on CUDA, float32 on CPU; see dtypes.resolve_dtype) -> torch dtype."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    name = resolve_dtype(name, str(device)) if isinstance(name, str) else name
    if name not in DTYPES:
        raise ConfigError("dtype", name, " | ".join((AUTO, *DTYPES)))
    return DTYPES[name]


class CheckpointReader:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint by their stored names."""

    def __init__(self, folder: Path, device: str | torch.device = "cpu"):
        """Tensors go to `device` one at a time as they are read: host memory holds at most one tensor (its
        converted copy) beside the memory-mapped shards, never the whole model."""
        self.folder, self.device = folder, torch.device(device)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
        elif (folder / "model.safetensors").is_file():
            with safe_open(folder / "model.safetensors", framework="pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        else:
            raise CheckpointError(f"{folder}: no model.safetensors.index.json or model.safetensors")
        missing = sorted({s for s in weight_map.values() if not (folder / s).is_file()})
        if missing:
            raise CheckpointError(f"{folder}: shard(s) named in the index are missing: {', '.join(missing)}")
        self.weight_map: dict[str, str] = weight_map
        config = folder / "config.json"
        self.quantization = Quantization.from_config(json.loads(config.read_text())) if config.is_file() else None
        self.consumed: set[str] = set()  # names read (a quantized checkpoint's tensors are checked against it)
        self.bytes_read = 0  # bytes of tensor data read from the shards so far (as stored)
        self.largest_read = 0  # the most bytes of one tensor read into host memory at once (as stored)
        self._stack = ExitStack()
        self._files: dict[str, object] = {}

    def close(self) -> None:
        self._stack.close()
        self._files.clear()

    def _file(self, shard: str):
        if shard not in self._files:
            self._files[shard] = self._stack.enter_context(safe_open(self.folder / shard, framework="pt"))
        return self._files[shard]

    def find(self, spec: TensorSpec) -> str:
        for name in (spec.name, *spec.fallbacks):
            if name in self.weight_map:
                return name
        raise CheckpointError(f"tensor {spec.name} (shape {list(spec.shape)}) is missing from the checkpoint "
                              f"{self.folder}")

    def read(self, spec: TensorSpec, dtype: torch.dtype, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Read one tensor (optionally only some rows of dim 0), checking its shape against `spec`. In a quantized
        checkpoint a weight stored in FP8 beside its `_scale` is dequantized by compressed-tensors first."""
        name = self.find(spec)
        if self.quantization is not None and f"{name}_scale" in self.weight_map:
            scale = self.read_raw(f"{name}_scale")
            weight = self._read(name, spec.shape, None, rows)
            keep = scale if rows is None or scale.numel() == 1 else scale[list(rows)]
            return self.quantization.dequantize(weight, keep.to(weight.device)).to(dtype)
        return self._read(name, spec.shape, dtype, rows)

    def read_raw(self, name: str) -> torch.Tensor:
        """A tensor as stored (dtype and shape), on the reader's device."""
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint {self.folder}")
        sl = self._file(self.weight_map[name]).get_slice(name)
        return self._read(name, tuple(sl.get_shape()), None, None)

    def _read(self, name: str, shape_expected: tuple[int, ...], dtype: torch.dtype | None,
              rows: Sequence[int] | None) -> torch.Tensor:
        self.consumed.add(name)
        spec = TensorSpec(name, shape_expected)
        sl = self._file(self.weight_map[name]).get_slice(name)
        shape = tuple(sl.get_shape())
        if shape != spec.shape:
            raise CheckpointError(f"tensor {name}: expected shape {list(spec.shape)}, found {list(shape)}")
        parts = [sl[:]] if rows is None else [sl[a:b] for a, b in _runs(rows)]
        n = sum(t.numel() * t.element_size() for t in parts)
        self.bytes_read += n
        self.largest_read = max(self.largest_read, n)
        parts = [t.to(device=self.device, dtype=dtype or t.dtype) for t in parts]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous [a, b) runs of sorted row ids, so each run is one slice read."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


@dataclass
class LoadedCheckpoint:
    folder: Path
    config: ModelConfig
    generation: SamplerSettings  # the checkpoint's sampler defaults (generation_config.json)
    model: DiffusionGemma
    expert_ids: tuple[int, ...]
    bytes_read: int = 0  # tensor data read from the shards (as stored)
    largest_read: int = 0  # the most of it in host memory at once (one tensor, as stored)
    experts_dtype: str = AUTO  # "auto" (as the weights) or "fp8"


@dataclass
class ExpertShard:
    """What an expert rank holds: some routed experts of every layer, and nothing else (no embeddings, no
    attention, no dense MLP)."""

    config: ModelConfig
    expert_ids: tuple[int, ...]  # global ids, ascending; local expert i is expert_ids[i]
    layers: list[ExpertWeights]
    bytes_read: int

    def nbytes(self) -> int:
        return sum(w.nbytes() for w in self.layers)


def read_text_weights(reader: CheckpointReader, cfg: ModelConfig, dtype: torch.dtype) -> TextWeights:
    tc = cfg.text
    g = {k: reader.read(s, dtype) for k, s in global_specs(tc).items()}
    layers = []
    for i in range(tc.num_layers):
        t = {k: reader.read(s, dtype) for k, s in layer_specs(tc, i).items()}
        t.setdefault("v_proj", None)
        layers.append(LayerWeights(**t))
    return TextWeights(layers=layers, **g)


def read_experts(reader: CheckpointReader, cfg: ModelConfig, dtype: torch.dtype,
                 expert_ids: Sequence[int], experts_dtype: str = AUTO) -> list[ExpertWeights]:
    """Each layer's experts `expert_ids`; with experts_dtype "fp8" quantized as each layer is read (one layer's
    full-precision experts exist at a time)."""
    check_experts_dtype(experts_dtype)
    if getattr(reader, "quantization", None) is not None:
        return [read_fp8_experts(reader, cfg, i, expert_ids) for i in range(cfg.text.num_layers)]
    out = []
    for i in range(cfg.text.num_layers):
        specs = expert_specs(cfg.text, i)
        gate_up, down = reader.read(specs["gate_up"], dtype, expert_ids), reader.read(specs["down"], dtype, expert_ids)
        out.append(ExpertWeights.quantized(gate_up, down) if experts_dtype == "fp8" else ExpertWeights(gate_up, down))
    return out


def read_fp8_experts(reader: CheckpointReader, cfg: ModelConfig, layer: int,
                     expert_ids: Sequence[int]) -> ExpertWeights:
    """One layer's experts from a pre-quantized checkpoint (model/quantized.py: the per-expert layout), as stored:
    FP8 weights and their per-output-channel scales."""
    tc = cfg.text
    I, D = tc.moe_intermediate_size, tc.hidden_size
    fused = expert_specs(tc, layer)["gate_up"]
    prefix = fused.name.removesuffix(".experts.gate_up_proj")
    shapes = {"gate_proj": (I, D), "up_proj": (I, D), "down_proj": (D, I)}
    weights: dict[str, list[torch.Tensor]] = {p: [] for p in PROJECTIONS}
    scales: dict[str, list[torch.Tensor]] = {p: [] for p in PROJECTIONS}
    for e in expert_ids:
        for proj in PROJECTIONS:
            w_name, s_name = expert_names(prefix, e, proj)
            if w_name not in reader.weight_map:
                stored = [n for n in (fused.name, *fused.fallbacks) if n in reader.weight_map]
                found = f"; it stores {stored[0]}" if stored else ""
                raise CheckpointError(f"tensor {w_name} is missing: a quantized checkpoint's experts are read in the "
                                      f"per-expert layout (experts.{{e}}.{{gate,up,down}}_proj.weight and "
                                      f".weight_scale){found}")
            w = reader.read_raw(w_name)
            if w.dtype != torch.float8_e4m3fn or tuple(w.shape) != shapes[proj]:
                raise CheckpointError(f"tensor {w_name}: expected float8_e4m3fn {list(shapes[proj])}, found "
                                      f"{str(w.dtype).removeprefix('torch.')} {list(w.shape)}")
            weights[proj].append(w)
            scales[proj].append(channel_scale(reader.read_raw(s_name), shapes[proj][0], s_name).to(w.device))
    gate_up = torch.stack([torch.cat([g, u]) for g, u in zip(weights["gate_proj"], weights["up_proj"], strict=True)])
    gate_up_scale = torch.stack([torch.cat([g, u]) for g, u in zip(scales["gate_proj"], scales["up_proj"],
                                                                   strict=True)])
    return ExpertWeights(gate_up, torch.stack(weights["down_proj"]), gate_up_scale, torch.stack(scales["down_proj"]))


def check_experts_dtype(name: str) -> None:
    if name not in EXPERTS_DTYPES:
        raise ConfigError("experts_dtype", name, " | ".join(EXPERTS_DTYPES))


def _expert_selection(experts: Sequence[int] | None, num_experts: int) -> tuple[int, ...]:
    if experts is None:
        return tuple(range(num_experts))
    ids = tuple(sorted(set(int(e) for e in experts)))
    bad = [e for e in ids if not 0 <= e < num_experts]
    if bad:
        raise ConfigError("experts", bad, f"expert ids in 0..{num_experts - 1}")
    return ids


def load_checkpoint(model: str | os.PathLike, dtype: str | torch.dtype = AUTO,
                    experts: Sequence[int] | None = None, revision: str | None = None,
                    device: str | torch.device = "cpu", experts_dtype: str = AUTO,
                    vision: bool = True) -> LoadedCheckpoint:
    """Load config, generation defaults and weights. `experts`: None = all, [] = none, or the ids to hold;
    `experts_dtype`: "auto" (as `dtype`) or "fp8" (quantized at load, kernels/fp8); `vision`: the vision tower
    too when the checkpoint has one (`model.vision`).

    With a partial expert set the returned model's backend only serves those experts; the caller replaces
    `model.experts` with a backend that reaches the others (expert parallelism).
    """
    folder = resolve_checkpoint(model, revision)
    cfg = load_model_config(folder)
    dt = parse_dtype(dtype, device)
    check_experts_dtype(experts_dtype)
    ids = _expert_selection(experts, cfg.text.num_experts)
    reader = CheckpointReader(folder, device)
    try:
        weights = read_text_weights(reader, cfg, dt)
        expert_weights = read_experts(reader, cfg, dt, ids, experts_dtype) if ids else []
        tower = VisionTower(cfg, read_vision_weights(reader, cfg, dt)) if vision and cfg.vision else None
        if reader.quantization is not None:
            check_consumed(reader.weight_map, reader.consumed)
            experts_dtype = "fp8"  # pre-quantized experts load as they are
    finally:
        reader.close()
    model_ = DiffusionGemma(cfg, weights, LocalExperts(expert_weights, ids, cfg.text.num_experts), tower)
    return LoadedCheckpoint(folder, cfg, load_generation_defaults(folder), model_, ids, reader.bytes_read,
                            reader.largest_read, experts_dtype)


def load_expert_shard(model: str | os.PathLike, experts: Sequence[int], dtype: str | torch.dtype = AUTO,
                      revision: str | None = None, device: str | torch.device = "cpu",
                      experts_dtype: str = AUTO) -> ExpertShard:
    """An expert rank's weights: only the given experts' tensors of every layer are read."""
    folder = resolve_checkpoint(model, revision)
    cfg = load_model_config(folder)
    ids = _expert_selection(experts, cfg.text.num_experts)
    if not ids:
        raise ConfigError("experts", list(experts), "at least one expert id (an expert rank holds some experts)")
    reader = CheckpointReader(folder, device)
    try:
        layers = read_experts(reader, cfg, parse_dtype(dtype, device), ids, experts_dtype)
        if reader.quantization is not None:
            check_consumed(reader.weight_map, reader.consumed, all_read=False)
    finally:
        reader.close()
    return ExpertShard(cfg, ids, layers, reader.bytes_read)

