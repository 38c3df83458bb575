"""Between the public API (protos/dgserve/v1) and the engine's typed messages; input validation lives here."""

from __future__ import annotations

from dataclasses import dataclass

from dgserve.model.config import ModelConfig
from dgserve.model.errors import ConfigError, InputError
from dgserve.model.settings import KNOBS, MAX_DENOISING_STEPS, MAX_SEED, SamplerSettings
from dgserve.model.tokenizer import chat_prompt_ids
from dgserve_client.v1 import dgserve_pb2 as pb

from ..engine.events import BlockCommitted, Draft, Finished
from ..messages import GenerateRequest

API_VERSION = "1.0"


TEXT_BYTES_PER_TOKEN = 8  # the default text limit: generous for real text (about 4 bytes per token)
ID_BYTES = 5  # the longest varint of a token id
REQUEST_SLACK_BYTES = 64 * 1024  # room for every other field of a request
MEDIA_BYTES = 32 * 1024 * 1024  # the default room for a request's images and videos (a vision checkpoint)


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int
    context_length: int
    canvas_length: int
    vocab_size: int
    max_text_bytes: int  # checked before any tokenization, so no text can hold the gateway for long
    max_request_bytes: int = 16 * 1024 * 1024  # gRPC refuses a larger message before reading it
    max_media_bytes: int = 0  # room in a request for its images and videos


def request_bytes_for(max_prompt_tokens: int, max_text_bytes: int, max_media_bytes: int = 0) -> int:
    """The largest request a valid prompt needs: its text or its ids, its images (base64 over HTTP: 4/3 of their
    bytes), and the other fields."""
    return max(max_text_bytes, ID_BYTES * max_prompt_tokens) + -(-4 * max_media_bytes // 3) + REQUEST_SLACK_BYTES


def limits_for(config: ModelConfig, max_prompt_tokens: int | None, max_text_bytes: int | None = None,
               max_request_bytes: int | None = None, max_media_bytes: int | None = None) -> Limits:
    """The gateway's limits; an unset byte limit is derived from the prompt limit (8 bytes of text per token; a
    message no larger than the largest valid request, so gRPC drops anything bigger before it is read), plus room
    for images when the checkpoint reads them."""
    ctx, C = config.text.max_position_embeddings, config.canvas_length
    cap = ctx - C
    tokens = min(max_prompt_tokens, cap) if max_prompt_tokens else cap
    text = max_text_bytes or TEXT_BYTES_PER_TOKEN * tokens
    media = max_media_bytes if max_media_bytes is not None else MEDIA_BYTES if config.vision is not None else 0
    return Limits(tokens, ctx, C, config.text.vocab_size, text,
                  max_request_bytes or request_bytes_for(tokens, text, media), media)


def check_text(text: str, limits: Limits, field: str) -> None:
    """Refuses empty text and text over the byte limit (cheaply: most text is measured without encoding)."""
    if not text:
        raise InputError(field, "text is empty")
    n = len(text) if len(text) > limits.max_text_bytes or 4 * len(text) <= limits.max_text_bytes \
        else len(text.encode("utf-8", "surrogatepass"))
    if n > limits.max_text_bytes:
        raise InputError(field, f"text of {'at least ' if n == len(text) else ''}{n} UTF-8 bytes exceeds the "
                                f"limit of {limits.max_text_bytes} bytes (gateway.max_text_bytes)")


def prompt_text(msg: pb.GenerateRequest, limits: Limits) -> str | None:
    """The text to tokenize (checked), or None when the prompt is token ids."""
    which = msg.WhichOneof("prompt")
    if which is None:
        raise InputError("prompt", "set text or token_ids")
    if which != "text":
        return None
    check_text(msg.text, limits, "prompt")
    return msg.text


def text_prompt_ids(tokenizer, msg: pb.GenerateRequest) -> list[int]:
    """The chat-templated ids of a text prompt (slow for long text: the gateway runs it off its event loop)."""
    return chat_prompt_ids(tokenizer, msg.text, enable_thinking=msg.thinking)


def to_request(msg: pb.GenerateRequest, request_id: str, text_ids: list[int] | None, limits: Limits,
               defaults: SamplerSettings, overrides: dict, timeout_s: float | None,
               tenant: str = "", media: tuple = ()) -> GenerateRequest:
    """Validate and convert (`text_ids`: the tokenized text prompt; `tenant`: the caller's, from its API key;
    `media`: the prompt's processed images and frames); raises InputError naming the field and the limit."""
    if text_ids is not None:
        ids = text_ids
    else:
        ids = list(msg.token_ids.ids)
        if not ids:
            raise InputError("token_ids", "is empty; at least one token is required")
        bad = next((i for i, t in enumerate(ids) if t >= limits.vocab_size), None)
        if bad is not None:
            raise InputError("token_ids", f"token id {ids[bad]} at index {bad} is outside the vocabulary "
                                          f"(0..{limits.vocab_size - 1})")
    if len(ids) > limits.max_prompt_tokens:
        raise InputError("prompt", f"{len(ids)} tokens exceed the limit of {limits.max_prompt_tokens} prompt "
                                   f"tokens (max_prompt_tokens)")
    seed = msg.seed if msg.HasField("seed") else 0
    if seed > MAX_SEED:
        raise InputError("seed", f"{seed} is outside 0..{MAX_SEED}")
    knobs = {k: getattr(msg.sampler, k) for k in KNOBS if msg.sampler.HasField(k)}
    try:  # validate here for an early, precise error; rank 0 builds the same settings again
        SamplerSettings.from_defaults(defaults, **{**overrides, **knobs})
    except ConfigError as e:
        raise InputError(f"sampler.{e.field}", f"{e.value!r} is not allowed; allowed: {e.allowed}") from e
    return GenerateRequest(tuple(ids), seed, knobs, msg.stream_drafts, timeout_s, request_id, tenant, tuple(media))


def stream_message(event, request_id: str, prompt_tokens: int, pad: int | None) -> pb.GenerateStreamResponse:
    if isinstance(event, Draft):
        return pb.GenerateStreamResponse(request_id=request_id, draft=pb.Draft(
            block=event.block, step=event.step, token_ids=event.token_ids))
    if isinstance(event, BlockCommitted):
        return pb.GenerateStreamResponse(request_id=request_id, block=pb.Block(
            block=event.block, token_ids=event.token_ids, text=event.text or "", steps=event.steps))
    return pb.GenerateStreamResponse(request_id=request_id, final=final_message(event, request_id, prompt_tokens,
                                                                               pad))


def final_message(event: Finished, request_id: str, prompt_tokens: int, pad: int | None) -> pb.GenerateResponse:
    s = event.stats
    completion = sum(1 for t in event.token_ids if pad is None or t != pad)
    return pb.GenerateResponse(
        request_id=request_id, token_ids=event.token_ids, text=event.text or "", finish_reason=event.finish_reason,
        usage=pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                       cached_prompt_tokens=s.cached_tokens),
        stats=pb.Stats(blocks=s.blocks, steps_per_block=s.steps_per_block, tokens_per_forward=s.tokens_per_forward,
                       time_to_first_block_s=s.time_to_first_block_s or 0.0, total_s=s.total_s, queue_s=s.queue_s))


def model_info(topo, config: ModelConfig, defaults: SamplerSettings, limits: Limits, model_id: str,
               server_version: str, media=None) -> pb.ModelInfo:
    """`media`: the gateway's image processor (model.media.MediaProcessor), when the checkpoint reads images."""
    base = SamplerSettings.from_defaults(defaults, **topo.sampler)
    d = pb.SamplerParams(**{k: getattr(base, k) for k in KNOBS})
    ranges = [
        pb.Range(name="max_new_tokens", min=1, max=limits.context_length - 1,
                 note="output grows by whole canvases; prompt + output must fit the context; cost: one KV block "
                      "and one commit pass per canvas"),
        pb.Range(name="max_denoising_steps", min=1, max=MAX_DENOISING_STEPS,
                 note="cost: at most this many forward passes of one canvas per block; a request runs at most "
                      "limits.max_request_s"),
        pb.Range(name="entropy_bound", min=0, max=float("inf"), min_exclusive=True),
        pb.Range(name="t_min", min=0, max=float("inf")),
        pb.Range(name="t_max", min=0, max=float("inf"), min_exclusive=True, note="must be > t_min"),
        pb.Range(name="stability_threshold", min=0, max=2**32 - 1,
                 note="values >= max_denoising_steps never stop a block early (the same as the step count); cost: "
                      "a history of min(value, max_denoising_steps) canvases"),
        pb.Range(name="confidence_threshold", min=0, max=float("inf"), min_exclusive=True),
        pb.Range(name="seed", min=0, max=float(MAX_SEED)),
    ]
    return pb.ModelInfo(
        api_version=API_VERSION, server_version=server_version, model_id=model_id,
        model_revision=topo.revision or "", vocab_size=limits.vocab_size,
        topology=pb.Topology(profile=topo.profile, units_min=topo.units.min, units_max=topo.units.max,
                             attention_ranks=topo.attention_ranks, expert_ranks=topo.expert_ranks,
                             dtype=topo.weights_dtype, device=topo.device,
                             experts_dtype="fp8" if topo.experts_dtype == "fp8" else topo.weights_dtype,
                             prefix_caching=topo.engine.prefix_cache,
                             prefix_chunk_tokens=topo.engine.prefill_chunk if topo.engine.prefix_cache else 0),
        limits=pb.Limits(max_prompt_tokens=limits.max_prompt_tokens, context_length=limits.context_length,
                         canvas_length=limits.canvas_length, max_request_bytes=limits.max_request_bytes,
                         max_text_bytes=limits.max_text_bytes,
                         max_running_per_unit=topo.running_capacity, max_queued_per_unit=topo.engine.max_queued,
                         max_request_s=topo.serve.max_request_s,
                         max_step_rows=topo.engine.max_step_rows(config.canvas_length)),
        sampler_defaults=d, sampler_ranges=ranges, vision=_vision(media, limits))


def _vision(media, limits: Limits) -> pb.Vision | None:
    if media is None:
        return None
    from dgserve.model.media import BUDGETS, FORMATS

    from .chat.media import MAX_MEDIA_PARTS

    return pb.Vision(visual_token_budgets=BUDGETS, default_image_budget=media.image_budget,
                     default_frame_budget=media.frame_budget, max_frames=media.max_frames,
                     max_media_parts=MAX_MEDIA_PARTS, max_media_bytes=limits.max_media_bytes, image_formats=FORMATS)
