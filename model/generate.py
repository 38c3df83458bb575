"""Single-request block-diffusion generation: prefill, denoise each block, commit, repeat (MODEL_SPEC 4.1, 5).

This is the in-process reference path (`dgserve generate`); the engine batches the same steps across requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .config import ModelConfig, num_blocks
from .errors import InputError
from .media import MediaItem, check_media, media_spans
from .sampler import BlockDenoiser, NoiseStream, SamplerSettings, finalize_block
from .transformer import DiffusionGemma
from .vision import as_patches


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated ids only, whole blocks, padding after EOS included
    steps_per_block: list[int]
    decoder_passes: int
    finish_reason: str  # "eos" | "length"
    timings: dict[str, float] = field(default_factory=dict)
    pad_token_id: int | None = None

    @property
    def tokens_per_forward(self) -> float:
        """Non-pad generated tokens per decoder pass (the reference's definition)."""
        valid = sum(1 for t in self.token_ids if self.pad_token_id is None or t != self.pad_token_id)
        return valid / self.decoder_passes if self.decoder_passes else 0.0


@dataclass(frozen=True)
class Progress:
    block: int
    blocks: int
    step: int
    max_steps: int
    draft_C: torch.Tensor | None = None
    committed: list[int] | None = None


def validate_prompt(ids: list[int] | torch.Tensor, config: ModelConfig, max_new_tokens: int,
                    field_name: str = "prompt_ids", media: Sequence[MediaItem] = ()) -> torch.Tensor:
    """The prompt as a tensor, checked: ids in the vocabulary, the context, and its image/video soft-token runs
    against `media` (one run per image or frame, in order, of the size each gives)."""
    t = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if t.numel() == 0:
        raise InputError(field_name, "is empty; at least one token is required")
    V = config.text.vocab_size
    bad = ((t < 0) | (t >= V)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise InputError(field_name, f"token id {int(t[i])} at index {i} is outside the vocabulary (0..{V - 1})")
    soft = config.media_token_ids
    if media or (soft and bool(torch.isin(t, torch.tensor(sorted(soft))).any())):
        if config.vision is None:
            raise InputError(field_name, "contains image/video soft tokens, but this checkpoint has no vision tower")
        check_media(t.tolist(), media, soft, config.image_token_id, field_name)
    total = t.numel() + num_blocks(max_new_tokens, config.canvas_length) * config.canvas_length
    if total > config.text.max_position_embeddings:
        raise InputError(field_name, f"{t.numel()} prompt tokens + {max_new_tokens} new tokens (rounded up to "
                                     f"whole {config.canvas_length}-token blocks) exceed the model's context "
                                     f"of {config.text.max_position_embeddings} positions")
    return t


@torch.inference_mode()
def generate(model: DiffusionGemma, prompt_ids: list[int] | torch.Tensor, settings: SamplerSettings,
             seed: int = 0, on_progress: Callable[[Progress], None] | None = None,
             generator: torch.Generator | None = None, prefetch_noise: bool = True,
             media: Sequence[MediaItem] = ()) -> GenerationResult:
    """`media`: the images and video frames whose soft tokens the prompt holds, in order (model.media)."""
    cfg = model.config
    prompt = validate_prompt(prompt_ids, cfg, settings.max_new_tokens, media=media).to(model.device)
    spans = media_spans(prompt.tolist(), cfg.media_token_ids) if media else []
    if generator is None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    temps = settings.temperatures()
    noise = NoiseStream(generator, cfg.canvas_length, cfg.text.vocab_size, prefetch=prefetch_noise)
    blocks = num_blocks(settings.max_new_tokens, cfg.canvas_length)
    cache = model.new_cache()
    out: list[int] = []
    steps: list[int] = []
    t0 = time.perf_counter()
    timings = {"prefill_s": 0.0, "denoise_s": 0.0, "commit_s": 0.0}
    t = time.perf_counter()
    if media and model.vision is None:
        raise InputError("media", "was given but the vision tower is not loaded (load_checkpoint(vision=True))")
    patches = [as_patches(m) for m in media]
    for i, p in enumerate(patches):
        model.vision.check(p, f"media[{i}]")
    soft_rows = model.vision.encode(patches) if media else []
    timings["vision_s"] = time.perf_counter() - t
    pending, finish = prompt, "length"
    for b in range(blocks):
        t = time.perf_counter()
        model.encode(cache, pending, media=spans if b == 0 else None, soft_rows=soft_rows)
        timings["prefill_s" if b == 0 else "commit_s"] += time.perf_counter() - t
        t = time.perf_counter()
        block = BlockDenoiser(settings, noise, temps)
        while not block.done:
            soft = None if block.soft_source_CV is None else model.soft_embedding(block.soft_source_CV)
            block.step(model.denoise(cache, block.canvas_C, soft), model.dtype)
            if on_progress:
                on_progress(Progress(b, blocks, block.steps, settings.max_denoising_steps, draft_C=block.argmax_C))
        timings["denoise_s"] += time.perf_counter() - t
        committed, hit_eos = finalize_block(block.argmax_C.tolist(), settings)
        out.extend(committed)
        steps.append(block.steps)
        if b == 0:
            timings["time_to_first_block_s"] = time.perf_counter() - t0
        if on_progress:
            on_progress(Progress(b, blocks, block.steps, settings.max_denoising_steps, committed=committed))
        if hit_eos:
            finish = "eos"
            break
        pending = block.argmax_C
    timings["total_s"] = time.perf_counter() - t0
    return GenerationResult(out, steps, sum(steps), finish, timings, settings.pad_token_id)
