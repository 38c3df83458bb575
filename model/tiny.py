"""`dgserve make-tiny`: a tiny random checkpoint in exactly the real checkpoint's layout.

config.json (the shipped form: global_head_dim, num_global_key_value_heads), generation_config.json (the shipped
sampler values), sharded safetensors with an index under the real tensor names (text weights under
`model.decoder.*`, encoder `layer_scalar` duplicates, a vision tower and projector), a byte-level BPE tokenizer
carrying the Gemma 4 special tokens, and chat_template.jinja. Deterministic from the seed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import ConfigError
from .weights import DECODER, ENCODER_TEXT

# Low ids follow the real vocabulary where it is known (pad 0, eos 1, bos 2, <|tool_response> 50, <|"|> 52,
# <turn|> 106); unused slots are filled with <unusedN> so every id is pinned.
FIXED_SPECIAL = {
    0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>",
    46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>", 50: "<|tool_response>",
    51: "<tool_response|>", 52: '<|"|>', 98: "<|think|>", 100: "<|channel>", 101: "<channel|>",
    105: "<|turn>", 106: "<turn|>",
}
MEDIA_TOKENS = ("<|image>", "<|image|>", "<image|>", "<|video|>")  # boi, image soft token, eoi, video
_CORPUS = (
    "DiffusionGemma writes text by denoising blocks of tokens. A canvas of tokens starts as noise and is refined "
    "over several steps; the tokens the model is sure of are kept, the rest are drawn again. When the canvas "
    "is stable and confident it is committed, encoded into the cache, and the next block begins. "
    "The quick brown fox jumps over the lazy dog. Hello world! How are you today? I am fine, thank you. "
    "What is the capital of France? Paris is the capital of France. Tell me a story about a robot who learns "
    "to paint. Once upon a time there was a small robot. It liked colours, numbers 0 1 2 3 4 5 6 7 8 9, and "
    "questions: why, how, when, where, who. def add(a, b): return a + b. {\"name\": \"value\", \"list\": [1, 2]} "
    "The weather is sunny with a light breeze. Servers answer requests; clients send prompts and read streams."
)


@dataclass(frozen=True)
class TinyPreset:
    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 128
    moe_intermediate_size: int = 32
    num_experts: int = 8
    top_k_experts: int = 2
    num_hidden_layers: int = 6
    full_every: int = 3  # layer pattern: (full_every - 1) sliding then 1 full
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    global_head_dim: int = 32
    num_global_key_value_heads: int = 1
    sliding_window: int = 32
    canvas_length: int = 32
    max_position_embeddings: int = 32768
    vision_hidden: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    vision_positions: int = 1024  # position table rows per axis: patch grids up to this many patches a side
    # A planted copy path. `branch_scale` scales every layer's post-attention and post-feedforward norm weights:
    # well under 1 the residual stream keeps each position's own token, so the logits favour it by a margin that
    # `head_scale` (on the final norm) sets. The sampler's stable-and-confident stop then fires when the falling
    # temperature makes every position confident, after a number of steps that varies with the canvas (as on the
    # real model), instead of never: random weights always run max_denoising_steps.
    branch_scale: float = 1.0
    head_scale: float = 1.0


PRESETS = {
    "tiny": TinyPreset(),
    # The CPU benchmark model of benchmarks/generate.py (hidden 512, 8 layers, 32 experts top-4, vocab 32000).
    "bench": TinyPreset(vocab_size=32000, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                        num_experts=32, top_k_experts=4, num_hidden_layers=8, full_every=4,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=64, global_head_dim=128,
                        num_global_key_value_heads=2, sliding_window=128, canvas_length=64,
                        vision_hidden=192, vision_layers=4, vision_heads=4),
    # The tiny model with a planted copy path: blocks stop after about 10 to 25 of 48 steps (tests of step counts).
    "confident": TinyPreset(branch_scale=0.02, head_scale=0.4),
}


# The real google/diffusiongemma-26B-A4B-it text shapes (MODEL_SPEC section 1), for planning memory and speed from
# the config alone (`real_config`). Not a make-tiny preset: its random weights would be 50 GB.
REAL_SHAPES = TinyPreset(vocab_size=262_144, hidden_size=2816, intermediate_size=2112, moe_intermediate_size=704,
                         num_experts=128, top_k_experts=8, num_hidden_layers=30, full_every=6,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                         num_global_key_value_heads=2, sliding_window=1024, canvas_length=256,
                         max_position_embeddings=262_144)
REAL_MEDIA_IDS = {"<|image>": 255_999, "<|image|>": 258_880, "<image|>": 258_882, "<|video|>": 258_884}


def real_config():
    """The real checkpoint's ModelConfig, without its files."""
    from .config import model_config_from_dict

    return model_config_from_dict(_config_json(REAL_SHAPES, REAL_MEDIA_IDS))


def write_real_config(folder: str | Path) -> Path:
    """config.json and generation_config.json of the real checkpoint in `folder` (no weights, no tokenizer)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(_config_json(REAL_SHAPES, REAL_MEDIA_IDS), indent=2))
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    return folder


def _layer_types(p: TinyPreset) -> list[str]:
    return ["full_attention" if (i + 1) % p.full_every == 0 else "sliding_attention"
            for i in range(p.num_hidden_layers - 1)] + ["full_attention"]


def build_tokenizer(vocab_size: int):
    """A Gemma-style BPE (spaces as U+2581, byte fallback) over a fixed corpus, with the Gemma 4 special
    tokens at pinned ids; deterministic."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers

    n_fixed = max(FIXED_SPECIAL) + 1
    specials = [FIXED_SPECIAL.get(i, f"<unused{i}>") for i in range(n_fixed)]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    probe = Tokenizer(models.BPE())
    probe.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(MEDIA_TOKENS) - len(byte_tokens),
                                  special_tokens=specials, show_progress=False)
    probe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    trained = json.loads(probe.to_str())["model"]
    learned = [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    vocab = {t: i for i, t in enumerate(specials + byte_tokens + learned)}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + list(MEDIA_TOKENS)])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", 2)])
    return tok


def _config_json(p: TinyPreset, media_ids: dict[str, int]) -> dict:
    text = {
        "model_type": "diffusion_gemma_text", "vocab_size": p.vocab_size, "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size, "moe_intermediate_size": p.moe_intermediate_size,
        "num_experts": p.num_experts, "top_k_experts": p.top_k_experts,
        "num_hidden_layers": p.num_hidden_layers, "layer_types": _layer_types(p),
        "num_attention_heads": p.num_attention_heads, "num_key_value_heads": p.num_key_value_heads,
        "head_dim": p.head_dim, "global_head_dim": p.global_head_dim,
        "num_global_key_value_heads": p.num_global_key_value_heads, "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6, "attention_bias": False, "sliding_window": p.sliding_window,
        "max_position_embeddings": p.max_position_embeddings, "final_logit_softcapping": 30.0,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
        },
        "use_bidirectional_attention": "vision", "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1,
        "tie_word_embeddings": True, "dtype": "bfloat16",
    }
    vision = {
        "model_type": "gemma4_vision", "hidden_size": p.vision_hidden, "intermediate_size": 2 * p.vision_hidden,
        "num_hidden_layers": p.vision_layers, "num_attention_heads": p.vision_heads,
        "num_key_value_heads": p.vision_heads, "head_dim": p.vision_hidden // p.vision_heads, "patch_size": 16,
        "pooling_kernel_size": 3, "position_embedding_size": p.vision_positions, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100.0}, "hidden_activation": "gelu_pytorch_tanh",
        "standardize": True, "use_clipped_linears": False, "default_output_length": 280,
    }
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
        "canvas_length": p.canvas_length, "tie_word_embeddings": True, "boi_token_id": media_ids["<|image>"],
        "eoi_token_id": media_ids["<image|>"], "image_token_id": media_ids["<|image|>"],
        "video_token_id": media_ids["<|video|>"], "eos_token_id": [1, 106], "vision_soft_tokens_per_image": 280,
        "text_config": text, "vision_config": vision, "dtype": "bfloat16",
    }


GENERATION_CONFIG = {
    "max_denoising_steps": 48, "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    "t_min": 0.4, "t_max": 0.8, "stability_threshold": 1, "confidence_threshold": 0.005,
    "eos_token_id": [1, 106, 50], "pad_token_id": 0, "bos_token_id": 2, "max_new_tokens": 256,
}


def _text_tensors(p: TinyPreset, g: torch.Generator) -> dict[str, torch.Tensor]:
    D, F, E, I, H = p.hidden_size, p.intermediate_size, p.num_experts, p.moe_intermediate_size, p.num_attention_heads

    def mat(*shape, fan_in):
        return torch.randn(*shape, generator=g) / math.sqrt(fan_in)

    def norm(n):  # non-trivial norm weights, so the reference's use of w (not 1 + w) is exercised
        return 1.0 + 0.25 * torch.randn(n, generator=g)

    out = {f"{DECODER}.embed_tokens.weight": torch.randn(p.vocab_size, D, generator=g) * 0.5,
           f"{DECODER}.norm.weight": norm(D) * p.head_scale, f"{DECODER}.self_conditioning.pre_norm.weight": norm(D),
           f"{DECODER}.self_conditioning.gate_proj.weight": mat(F, D, fan_in=D),
           f"{DECODER}.self_conditioning.up_proj.weight": mat(F, D, fan_in=D),
           f"{DECODER}.self_conditioning.down_proj.weight": mat(D, F, fan_in=F)}
    for i, t in enumerate(_layer_types(p)):
        full = t == "full_attention"
        d = p.global_head_dim if full else p.head_dim
        kv = p.num_global_key_value_heads if full else p.num_key_value_heads
        pre = f"{DECODER}.layers.{i}"
        out |= {f"{pre}.self_attn.q_proj.weight": mat(H * d, D, fan_in=D),
                f"{pre}.self_attn.k_proj.weight": mat(kv * d, D, fan_in=D),
                f"{pre}.self_attn.o_proj.weight": mat(D, H * d, fan_in=H * d),
                f"{pre}.self_attn.q_norm.weight": norm(d), f"{pre}.self_attn.k_norm.weight": norm(d),
                f"{pre}.mlp.gate_proj.weight": mat(F, D, fan_in=D), f"{pre}.mlp.up_proj.weight": mat(F, D, fan_in=D),
                f"{pre}.mlp.down_proj.weight": mat(D, F, fan_in=F),
                f"{pre}.router.proj.weight": mat(E, D, fan_in=D), f"{pre}.router.scale": norm(D),
                f"{pre}.router.per_expert_scale": 0.5 + torch.rand(E, generator=g),
                f"{pre}.experts.gate_up_proj": mat(E, 2 * I, D, fan_in=D),
                f"{pre}.experts.down_proj": mat(E, D, I, fan_in=I),
                f"{pre}.layer_scalar": 0.5 + 0.5 * torch.rand(1, generator=g)}
        if not full:
            out[f"{pre}.self_attn.v_proj.weight"] = mat(kv * d, D, fan_in=D)
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
                  "pre_feedforward_layernorm_2"):
            out[f"{pre}.{n}.weight"] = norm(D)
        for n in ("post_attention_layernorm", "post_feedforward_layernorm"):
            out[f"{pre}.{n}.weight"] *= p.branch_scale
        # The shipped checkpoint duplicates layer_scalar for the encoder pass; keep the same layout.
        out[f"{ENCODER_TEXT}.layers.{i}.layer_scalar"] = out[f"{pre}.layer_scalar"].clone()
    return out


def _vision_tensors(p: TinyPreset, g: torch.Generator) -> dict[str, torch.Tensor]:
    """The tower and projector, with norms, position tables and standardization away from their trivial values so
    every term of the tower's math changes its output (the text weights are drawn first: they do not move)."""
    Hv, D, d = p.vision_hidden, p.hidden_size, p.vision_hidden // p.vision_heads
    pre = "model.encoder.vision_tower"

    def mat(*shape):
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

    def norm(n):
        return 1.0 + 0.25 * torch.randn(n, generator=g)

    out = {f"{pre}.patch_embedder.input_proj.weight": mat(Hv, 3 * 16 * 16),
           f"{pre}.patch_embedder.position_embedding_table": 0.5 * torch.randn(2, p.vision_positions, Hv, generator=g),
           f"{pre}.std_bias": 0.5 * torch.randn(Hv, generator=g), f"{pre}.std_scale": 0.5 + torch.rand(Hv, generator=g),
           "model.encoder.embed_vision.embedding_projection.weight": mat(D, Hv)}
    for i in range(p.vision_layers):
        lp = f"{pre}.encoder.layers.{i}"
        for n in ("q", "k", "v", "o"):
            out[f"{lp}.self_attn.{n}_proj.linear.weight"] = mat(Hv, Hv)
        out[f"{lp}.self_attn.q_norm.weight"] = norm(d)
        out[f"{lp}.self_attn.k_norm.weight"] = norm(d)
        out[f"{lp}.mlp.gate_proj.linear.weight"] = mat(2 * Hv, Hv)
        out[f"{lp}.mlp.up_proj.linear.weight"] = mat(2 * Hv, Hv)
        out[f"{lp}.mlp.down_proj.linear.weight"] = mat(Hv, 2 * Hv)
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            out[f"{lp}.{n}.weight"] = norm(Hv)
    return out


# Gemma 4's video processor defaults (transformers' Gemma4VideoProcessor): 70 soft tokens a frame, 32 frames.
VIDEO_PROCESSOR = {"video_processor_type": "Gemma4VideoProcessor", "patch_size": 16, "pooling_kernel_size": 3,
                   "max_soft_tokens": 70, "num_frames": 32, "do_sample_frames": True, "do_convert_rgb": True,
                   "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                   "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0], "resample": 3}


def write_processor_configs(folder: Path, image_soft_tokens: int = 280) -> None:
    """The image processor's file as transformers writes it, the video processor's and the processor's."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    Gemma4ImageProcessorPil(max_soft_tokens=image_soft_tokens).save_pretrained(folder)
    (folder / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PROCESSOR, indent=2))
    (folder / "processor_config.json").write_text(json.dumps({
        "processor_class": "Gemma4Processor", "image_seq_length": image_soft_tokens}, indent=2))


def _stored(name: str, t: torch.Tensor) -> torch.Tensor:
    """bfloat16, as the real checkpoint; a quantized checkpoint's FP8 weights and float32 scales as they are."""
    keep = t.dtype == torch.float8_e4m3fn or name.endswith("_scale")
    return (t if keep else t.to(torch.bfloat16)).contiguous()


def _write_shards(folder: Path, tensors: dict[str, torch.Tensor], num_shards: int) -> None:
    names = sorted(tensors)
    per = math.ceil(len(names) / num_shards)
    weight_map, total = {}, 0
    for s in range(num_shards):
        shard = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: _stored(n, tensors[n]) for n in names[s * per:(s + 1) * per]}
        save_file(part, folder / shard, metadata={"format": "pt"})
        weight_map |= {n: shard for n in part}
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_tiny(folder: str | Path, seed: int = 0, preset: str = "tiny", num_shards: int = 3,
              experts_dtype: str = "auto", quantize_dense: bool = False) -> Path:
    """A tiny random checkpoint in the real layout; experts_dtype "fp8": already quantized (tiny_fp8.py), as a
    compressed-tensors FP8_DYNAMIC checkpoint (with `quantize_dense`, its dense MLP too)."""
    if experts_dtype not in ("auto", "fp8"):
        raise ConfigError("experts_dtype", experts_dtype, "auto | fp8")
    if preset not in PRESETS:
        raise ConfigError("preset", preset, " | ".join(PRESETS))
    if num_shards < 2:
        raise ConfigError("num_shards", num_shards, ">= 2 (the real checkpoint is sharded)")
    p = PRESETS[preset]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(min(p.vocab_size, 1024))
    media_ids = {t: tok.token_to_id(t) for t in MEDIA_TOKENS}
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "model_max_length": p.max_position_embeddings, "padding_side": "left",
        "boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
    }, indent=2))
    (folder / "chat_template.jinja").write_text(resources.files(__package__).joinpath("chat_template.jinja")
                                               .read_text())
    config = _config_json(p, media_ids)
    write_processor_configs(folder)
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    g = torch.Generator().manual_seed(seed)
    tensors = _text_tensors(p, g) | _vision_tensors(p, g)
    if experts_dtype == "fp8":
        from .tiny_fp8 import quantize_checkpoint

        config["quantization_config"] = quantize_checkpoint(tensors, p.num_hidden_layers, quantize_dense)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _write_shards(folder, tensors, num_shards)
    (folder / "dgserve_tiny.json").write_text(json.dumps({"seed": seed, "preset": preset, **asdict(p)}))
    return folder
