"""The Gemma 4 vision tower and its projector (MODEL_SPEC 3.8): image patches -> soft tokens in the text width.

16x16x3 patches (as the checkpoint's image processor cuts them) are projected, given a learned 2-D position (an x
and a y table, summed), and run through bidirectional layers: q/k RMS norms with weights, a scale-free v norm,
attention scale 1.0 and axial 2-D RoPE (theta 100: the first half of each head rotates with x, the second with y).
Each k x k cell of patches is then averaged (pooling by position), scaled by sqrt(hidden) and standardized in
float32, and projected to the text width after a scale-free RMS norm. The rows replace the prompt's soft-token
placeholders in the encoder pass (MODEL_SPEC 3.2).

Images of any patch count run packed: the projections and MLPs over all rows at once, attention per image over
its own patches only (no padding rows: they would change nothing but cost time).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig, VisionConfig
from .errors import InputError
from .layers import apply_rope, gated_mlp, linear, rms_norm
from .weights import TensorSpec

TOWER = "model.encoder.vision_tower"
PROJECTOR = "model.encoder.embed_vision"


@dataclass(frozen=True)
class ImagePatches:
    """One image or video frame as the image processor cuts it, padding removed."""

    pixels_PC: torch.Tensor  # [P, 3 * patch^2] float32 in [0, 1]
    positions_P2: torch.Tensor  # [P, 2] long: (x, y) of each patch in the grid

    @property
    def num_patches(self) -> int:
        return int(self.pixels_PC.shape[0])

    def soft_tokens(self, pooling_kernel_size: int) -> int:
        return self.num_patches // pooling_kernel_size**2


def as_patches(item) -> ImagePatches:
    """A processed image (model.media.MediaItem: numpy arrays) as tensors."""
    return ImagePatches(torch.from_numpy(item.values()), torch.from_numpy(item.positions))


@dataclass
class VisionLayerWeights:
    q_proj: torch.Tensor  # [H*d, Hv]
    k_proj: torch.Tensor  # [Kv*d, Hv]
    v_proj: torch.Tensor  # [Kv*d, Hv]
    o_proj: torch.Tensor  # [Hv, H*d]
    q_norm: torch.Tensor  # [d]
    k_norm: torch.Tensor  # [d]
    mlp_gate: torch.Tensor  # [I, Hv]
    mlp_up: torch.Tensor  # [I, Hv]
    mlp_down: torch.Tensor  # [Hv, I]
    input_layernorm: torch.Tensor
    post_attention_layernorm: torch.Tensor
    pre_feedforward_layernorm: torch.Tensor
    post_feedforward_layernorm: torch.Tensor


@dataclass
class VisionWeights:
    input_proj: torch.Tensor  # [Hv, 3 * patch^2]
    position_table: torch.Tensor  # [2, S, Hv]: x rows, y rows
    layers: list[VisionLayerWeights]
    projection: torch.Tensor  # [D, Hv]
    std_bias: torch.Tensor | None = None  # [Hv], with `standardize`
    std_scale: torch.Tensor | None = None

    def nbytes(self) -> int:
        tensors = [self.input_proj, self.position_table, self.projection, self.std_bias, self.std_scale]
        tensors += [t for lw in self.layers for t in vars(lw).values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def vision_specs(vc: VisionConfig, text_hidden: int) -> dict[str, TensorSpec]:
    Hv = vc.hidden_size
    out = {"input_proj": TensorSpec(f"{TOWER}.patch_embedder.input_proj.weight", (Hv, vc.patch_pixels)),
           "position_table": TensorSpec(f"{TOWER}.patch_embedder.position_embedding_table",
                                        (2, vc.position_embedding_size, Hv)),
           "projection": TensorSpec(f"{PROJECTOR}.embedding_projection.weight", (text_hidden, Hv))}
    if vc.standardize:
        out |= {name: TensorSpec(f"{TOWER}.{name}", (Hv,)) for name in ("std_bias", "std_scale")}
    return out


def vision_layer_specs(vc: VisionConfig, i: int) -> dict[str, TensorSpec]:
    Hv, H, Kv, d, I = (vc.hidden_size, vc.num_attention_heads, vc.num_key_value_heads, vc.head_dim,
                       vc.intermediate_size)
    p = f"{TOWER}.encoder.layers.{i}"
    out = {"q_proj": TensorSpec(f"{p}.self_attn.q_proj.linear.weight", (H * d, Hv)),
           "k_proj": TensorSpec(f"{p}.self_attn.k_proj.linear.weight", (Kv * d, Hv)),
           "v_proj": TensorSpec(f"{p}.self_attn.v_proj.linear.weight", (Kv * d, Hv)),
           "o_proj": TensorSpec(f"{p}.self_attn.o_proj.linear.weight", (Hv, H * d)),
           "q_norm": TensorSpec(f"{p}.self_attn.q_norm.weight", (d,)),
           "k_norm": TensorSpec(f"{p}.self_attn.k_norm.weight", (d,)),
           "mlp_gate": TensorSpec(f"{p}.mlp.gate_proj.linear.weight", (I, Hv)),
           "mlp_up": TensorSpec(f"{p}.mlp.up_proj.linear.weight", (I, Hv)),
           "mlp_down": TensorSpec(f"{p}.mlp.down_proj.linear.weight", (Hv, I))}
    for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"):
        out[norm] = TensorSpec(f"{p}.{norm}.weight", (Hv,))
    return out


def read_vision_weights(reader, cfg: ModelConfig, dtype: torch.dtype) -> VisionWeights:
    """The tower and projector from a CheckpointReader (model/loader.py)."""
    vc = cfg.vision
    assert vc is not None
    g = {k: reader.read(s, dtype) for k, s in vision_specs(vc, cfg.text.hidden_size).items()}
    layers = [VisionLayerWeights(**{k: reader.read(s, dtype) for k, s in vision_layer_specs(vc, i).items()})
              for i in range(vc.num_layers)]
    return VisionWeights(layers=layers, **g)


def axial_rope(vc: VisionConfig, positions_P2: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos, sin [P, 1, d/2] for x and for y: each half of a head rotates with one axis (split-half pairing)."""
    spatial = vc.head_dim // 2
    inv = 1.0 / (vc.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float, device=positions_P2.device)
                                   / spatial))
    out = []
    for axis in (0, 1):
        freqs = positions_P2[:, axis, None].float() * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        out += [emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]]
    return tuple(out)


def _rope_2d(x_PHd: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> torch.Tensor:
    cos_x, sin_x, cos_y, sin_y = rope
    half = x_PHd.shape[-1] // 2
    return torch.cat((apply_rope(x_PHd[..., :half], cos_x, sin_x), apply_rope(x_PHd[..., half:], cos_y, sin_y)),
                     dim=-1)


def check_patches(vc: VisionConfig, image: ImagePatches, where: str) -> None:
    """Shapes and a grid the tower can take; names `where` (the request's part) otherwise."""
    k = vc.pooling_kernel_size
    if image.pixels_PC.ndim != 2 or image.pixels_PC.shape[1] != vc.patch_pixels:
        raise InputError(where, f"patches of shape {list(image.pixels_PC.shape)}; expected [P, {vc.patch_pixels}]")
    if tuple(image.positions_P2.shape) != (image.num_patches, 2):
        raise InputError(where, f"positions of shape {list(image.positions_P2.shape)}; expected "
                                f"[{image.num_patches}, 2]")
    if image.num_patches == 0 or image.num_patches % (k * k):
        raise InputError(where, f"{image.num_patches} patches; expected a positive multiple of {k * k}")
    pos = image.positions_P2
    if int(pos.min()) < 0 or int(pos.max()) >= vc.position_embedding_size:
        raise InputError(where, f"a patch grid of {int(pos[:, 0].max()) + 1} x {int(pos[:, 1].max()) + 1}: "
                                f"each side must stay under {vc.position_embedding_size} patches")


class VisionTower:
    """Encodes images (or video frames) to soft-token rows [n, D] in the text model's width."""

    def __init__(self, cfg: ModelConfig, weights: VisionWeights):
        if cfg.vision is None:
            raise InputError("config.json", "has no vision_config: this checkpoint cannot read images")
        self.cfg, self.vc, self.weights = cfg, cfg.vision, weights
        self.dtype = weights.input_proj.dtype
        self.device = weights.input_proj.device

    def check(self, image: ImagePatches, where: str) -> None:
        check_patches(self.vc, image, where)

    @torch.inference_mode()
    def encode(self, images: list[ImagePatches], on_layer=None) -> list[torch.Tensor]:
        """Soft-token rows per image [n_i, D], n_i = P_i / k^2, in the model dtype. `on_layer()` is called after
        each layer (an engine's progress beat: its watchdog sees a long encode advancing)."""
        if not images:
            return []
        w, vc = self.weights, self.vc
        pixels = torch.cat([im.pixels_PC for im in images]).to(self.device)
        positions = torch.cat([im.positions_P2 for im in images]).to(self.device).long()
        bounds = [0]
        for im in images:
            bounds.append(bounds[-1] + im.num_patches)
        h = linear((2 * (pixels.float() - 0.5)).to(self.dtype), w.input_proj)
        h = h + (w.position_table[0][positions[:, 0]] + w.position_table[1][positions[:, 1]])
        rope = axial_rope(vc, positions, self.dtype)
        for lw in w.layers:
            h = self._layer(lw, h, rope, bounds)
            if on_layer is not None:
                on_layer()
        pooled = [self._pool(h[a:b], positions[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
        feats = torch.cat(pooled)
        if w.std_bias is not None:
            feats = (feats - w.std_bias.float()) * w.std_scale.float()
        out = linear(rms_norm(feats.to(self.dtype), None, vc.rms_norm_eps), w.projection)
        sizes = [p.shape[0] for p in pooled]
        return list(out.split(sizes))

    def _layer(self, lw: VisionLayerWeights, h: torch.Tensor, rope: tuple, bounds: list[int]) -> torch.Tensor:
        eps = self.vc.rms_norm_eps
        a = self._attention(lw, rms_norm(h, lw.input_layernorm, eps), rope, bounds)
        h = h + rms_norm(a, lw.post_attention_layernorm, eps)
        m = gated_mlp(rms_norm(h, lw.pre_feedforward_layernorm, eps), lw.mlp_gate, lw.mlp_up, lw.mlp_down)
        return h + rms_norm(m, lw.post_feedforward_layernorm, eps)

    def _attention(self, lw: VisionLayerWeights, x_PD: torch.Tensor, rope: tuple, bounds: list[int]) -> torch.Tensor:
        vc, eps, P = self.vc, self.vc.rms_norm_eps, x_PD.shape[0]
        H, Kv, d = vc.num_attention_heads, vc.num_key_value_heads, vc.head_dim
        q = _rope_2d(rms_norm(linear(x_PD, lw.q_proj).view(P, H, d), lw.q_norm, eps), rope)
        k = _rope_2d(rms_norm(linear(x_PD, lw.k_proj).view(P, Kv, d), lw.k_norm, eps), rope)
        v = rms_norm(linear(x_PD, lw.v_proj).view(P, Kv, d), None, eps)
        if Kv != H:
            k, v = k.repeat_interleave(H // Kv, dim=1), v.repeat_interleave(H // Kv, dim=1)
        out = torch.empty(P, H, d, dtype=x_PD.dtype, device=x_PD.device)
        for a, b in zip(bounds, bounds[1:], strict=False):  # each image attends to its own patches, both ways
            o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None],
                                               v[a:b].transpose(0, 1)[None], scale=1.0)
            out[a:b] = o[0].transpose(0, 1)
        return linear(out.reshape(P, H * d), lw.o_proj)

    def _pool(self, h_PD: torch.Tensor, positions_P2: torch.Tensor) -> torch.Tensor:
        """Average of each k x k cell of patches (cells in row-major order), times sqrt(hidden): float32 [n, Hv]."""
        k = self.vc.pooling_kernel_size
        n = h_PD.shape[0] // (k * k)
        cells_x = (int(positions_P2[:, 0].max()) + 1) // k
        cell = positions_P2[:, 0] // k + cells_x * (positions_P2[:, 1] // k)
        pooled = torch.zeros(n, h_PD.shape[1], dtype=torch.float32, device=h_PD.device)
        pooled.index_add_(0, cell, h_PD.float() * (1.0 / (k * k)))
        # the average is rounded to the model dtype before the float32 scaling, as the reference does
        return pooled.to(h_PD.dtype).float() * self.vc.hidden_size**0.5
