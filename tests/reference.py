"""Helpers that build reference checkpoints with transformers 5.23.0 (tests and benchmarks only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class RefSpec:
    """A tiny random DiffusionGemma that differs from the others in the shapes the parity tests care about."""

    name: str
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    moe_intermediate_size: int = 32
    num_experts: int = 8
    top_k_experts: int = 2
    layer_types: tuple[str, ...] = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    global_head_dim: int = 32
    num_global_key_value_heads: int = 1
    sliding_window: int = 8
    canvas_length: int = 16
    max_position_embeddings: int = 4096
    generation: dict = field(default_factory=dict)
    seed: int = 0
    # the vision tower (small unless a spec tests images)
    vision_hidden: int = 16
    vision_layers: int = 1
    vision_heads: int = 2
    vision_kv_heads: int = 2
    vision_positions: int = 64
    standardize: bool = False


SPECS = {
    "a": RefSpec("a"),
    "b": RefSpec("b", vocab_size=700, hidden_size=48, intermediate_size=96, moe_intermediate_size=24,
                 num_experts=6, top_k_experts=3,
                 layer_types=("sliding_attention", "sliding_attention", "full_attention"),
                 num_attention_heads=6, num_key_value_heads=3, head_dim=8, global_head_dim=16,
                 num_global_key_value_heads=2, sliding_window=12, canvas_length=8, seed=1),
    "c": RefSpec("c", vocab_size=400, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                 num_experts=4, top_k_experts=1,
                 layer_types=("full_attention", "sliding_attention", "sliding_attention", "sliding_attention",
                              "full_attention"),
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=16,
                 num_global_key_value_heads=1, sliding_window=5, canvas_length=12, seed=2),
    # The real checkpoint's structure at small width: 16 heads of 256 with 8 KV heads on sliding layers, 2 KV heads
    # of 512 with proportional RoPE on the full layer, window 1024, canvas 256, 128 experts top-8 (so many
    # (item, expert) groups are smaller than a GEMM's small-M bound). Widths are multiples of 64, as the real
    # ones are (2816, 2112, 704): the elementwise kernels then split work the same way at 1 and 2 threads.
    "real": RefSpec("real", vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                    num_experts=128, top_k_experts=8, layer_types=("sliding_attention",) * 5 + ("full_attention",),
                    num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                    num_global_key_value_heads=2, sliding_window=1024, canvas_length=256, seed=3),
    # Images: a tower of two layers with grouped KV heads and standardization; a window shorter than an image's
    # soft tokens, so an image block's bidirectional overlay reaches past the sliding window.
    "v": RefSpec("v", sliding_window=8, canvas_length=16, seed=4, vision_hidden=32, vision_layers=2,
                 vision_heads=4, vision_kv_heads=2, vision_positions=128, standardize=True),
}


def build_reference(spec: RefSpec, folder: Path | None = None, dtype=torch.float32, degenerate: bool = False):
    """A random transformers model with non-trivial norms and scales, optionally saved with save_pretrained."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaTextConfig
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig
    from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig

    torch.manual_seed(spec.seed)
    tc = DiffusionGemmaTextConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        moe_intermediate_size=spec.moe_intermediate_size, num_experts=spec.num_experts,
        top_k_experts=spec.top_k_experts, num_hidden_layers=len(spec.layer_types),
        layer_types=list(spec.layer_types), num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, head_dim=spec.head_dim,
        global_head_dim=spec.global_head_dim, num_global_key_value_heads=spec.num_global_key_value_heads,
        sliding_window=spec.sliding_window, max_position_embeddings=spec.max_position_embeddings,
        use_bidirectional_attention="vision", final_logit_softcapping=30.0, rms_norm_eps=1e-6,
        pad_token_id=0, eos_token_id=1, bos_token_id=2)
    vc = Gemma4VisionConfig(hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden,
                            num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                            num_key_value_heads=spec.vision_kv_heads, head_dim=spec.vision_hidden // spec.vision_heads,
                            patch_size=16, pooling_kernel_size=3, position_embedding_size=spec.vision_positions,
                            standardize=spec.standardize)
    V = spec.vocab_size
    cfg = DiffusionGemmaConfig(text_config=tc, vision_config=vc, canvas_length=spec.canvas_length,
                               boi_token_id=V - 3, eoi_token_id=V - 2, image_token_id=V - 1)
    model = DiffusionGemmaForBlockDiffusion._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    randomize(model, spec.seed)
    if degenerate:  # all logits zero: a constant argmax, so "stable" fires on the second step
        with torch.no_grad():
            model.model.decoder.norm.weight.zero_()
    model.generation_config = DiffusionGemmaGenerationConfig(**spec.generation)
    model = model.to(dtype).eval()
    if folder is not None:
        model.save_pretrained(folder, max_shard_size="200KB")
    return model


def randomize(model, seed: int) -> None:
    """Norm weights, router scales and layer scalars away from 1 so every term of the math is exercised."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("router.scale"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("per_expert_scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.fill_(0.6 + 0.6 * float(torch.rand((), generator=g)))
            elif name.endswith("std_bias"):
                b.copy_(0.5 * torch.randn(b.shape, generator=g))
            elif name.endswith("std_scale"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def load_reference(folder: Path):
    """The reference exactly as a user loads it: from the saved folder, sdpa attention, default dynamic cache."""
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=torch.float32,
                                                           attn_implementation="sdpa").eval()


@torch.inference_mode()
def reference_generate(ref, prompt: list[int], seed: int, **kwargs) -> tuple[list[int], list]:
    """The reference's new tokens after torch.manual_seed(seed), and its per-step argmax drafts."""
    drafts: list = []

    class Streamer:
        def put(self, value):
            pass

        def put_draft(self, value):
            drafts.append(value[0].clone())

        def end(self):
            pass

    torch.manual_seed(seed)
    out = ref.generate(torch.tensor([prompt]), streamer=Streamer(), **kwargs)
    return out.sequences[0, len(prompt):].tolist(), drafts
