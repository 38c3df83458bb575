"""Images and videos in chat messages: content parts checked into MediaParts, then processed with the checkpoint's
processor files (dgserve.model.media) into what the engine's vision tower reads.

Part forms accepted (every error names the part, e.g. `messages[1].content[2]`):
- OpenAI's `{"type": "image_url", "image_url": {"url": "data:image/png;base64,...", "detail": "auto|low|high"}}`
  (low: 70 soft tokens, high: 1120, auto: the checkpoint's default) and dgserve's `visual_token_budget` beside
  `detail`. Remote URLs are refused: the server fetches nothing.
- `{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,...", "fps": 1}}` (a file, sampled at fps)
  or `{"video_url": {"frames": ["data:image/png;base64,...", ...], "fps": 1}}` (frames taken fps times a second),
  with `visual_token_budget` per frame.
- The gRPC API's raw bytes: `{"type": "image", "data": b"..."}`, `{"type": "video", "data": b"...",
  "frames": [b"..."], "fps": 1}`, each with an optional `visual_token_budget`.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass

from dgserve.model.errors import InputError

MAX_MEDIA_PARTS = 32  # images and videos per request
MAX_MEDIA_ITEMS = 128  # images and video frames per request
MAX_MEDIA_TOKENS = 32_768  # their soft tokens per request (about 220 MB of patches at most)
DETAIL = {"low": 70, "high": 1120, "auto": None}
MEDIA_TYPES = ("image_url", "video_url", "image", "video")


@dataclass(frozen=True)
class MediaPart:
    kind: str  # "image" | "video"
    where: str  # the part's field, for errors
    data: bytes = b""  # the image, or the video file
    frames: tuple[bytes, ...] = ()  # a video given as frames
    budget: int | None = None  # soft tokens an image (a frame); None: the checkpoint's default
    fps: float | None = None


def data_url(url, where: str, what: str) -> bytes:
    """The bytes of a base64 `data:` URL."""
    if not isinstance(url, str) or not url:
        raise InputError(where, f"must be a data: URL holding the {what} (base64)")
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url else url[:16]
        raise InputError(where, f"is a {scheme!r} URL; the server fetches nothing: send the {what} inline as a "
                                f"data: URL (data:<type>;base64,...)")
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise InputError(where, "must be a base64 data: URL (data:<type>;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(where, "is not valid base64") from None


def _budget(spec: dict, where: str) -> int | None:
    budget = spec.get("visual_token_budget")
    detail = spec.get("detail", "auto")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise InputError(f"{where}.visual_token_budget", f"must be an integer, got {budget!r}")
        return budget
    if detail not in DETAIL:
        raise InputError(f"{where}.detail", f"{detail!r} is not one of auto | low | high")
    return DETAIL[detail]


def _fps(value, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{where}.fps", f"must be a number of frames a second > 0, got {value!r}")
    return float(value)


def media_part(part: dict, where: str) -> MediaPart:
    """One image or video content part, checked (not decoded yet)."""
    kind = part.get("type")
    if kind == "image_url":
        spec = part.get("image_url")
        if isinstance(spec, str):
            spec = {"url": spec}
        if not isinstance(spec, dict):
            raise InputError(f"{where}.image_url", "must be {\"url\": \"data:image/...;base64,...\"}")
        return MediaPart("image", where, data_url(spec.get("url"), f"{where}.image_url.url", "image"),
                         budget=_budget(spec, f"{where}.image_url"))
    if kind == "video_url":
        spec = part.get("video_url")
        if isinstance(spec, str):
            spec = {"url": spec}
        if not isinstance(spec, dict):
            raise InputError(f"{where}.video_url", "must be {\"url\": \"data:video/...;base64,...\"} or "
                                                   "{\"frames\": [data: URLs]}")
        frames = spec.get("frames")
        if frames is not None:
            if not isinstance(frames, list):
                raise InputError(f"{where}.video_url.frames", "must be a list of data: URLs")
            data = tuple(data_url(f, f"{where}.video_url.frames[{i}]", "frame") for i, f in enumerate(frames))
            return MediaPart("video", where, frames=data, budget=_budget(spec, f"{where}.video_url"),
                             fps=_fps(spec.get("fps"), f"{where}.video_url"))
        return MediaPart("video", where, data_url(spec.get("url"), f"{where}.video_url.url", "video"),
                         budget=_budget(spec, f"{where}.video_url"), fps=_fps(spec.get("fps"), f"{where}.video_url"))
    if kind in ("image", "video"):
        data, frames = part.get("data", b""), tuple(part.get("frames", ()))
        if not isinstance(data, bytes) or not all(isinstance(f, bytes) for f in frames):
            raise InputError(where, "image and video data must be bytes")
        if kind == "image" and not data:
            raise InputError(f"{where}.data", "is empty; expected PNG, JPEG or WebP bytes")
        if kind == "video" and bool(data) == bool(frames):
            raise InputError(where, "a video is either a file (data) or frames, not both and not neither")
        return MediaPart(kind, where, data, frames, _budget(part, where), _fps(part.get("fps"), where))
    raise InputError(f"{where}.type", f"{kind!r} is not one of text | {' | '.join(MEDIA_TYPES)}")


def check_parts(parts: list[MediaPart], max_media_bytes: int | None) -> None:
    """Counts and bytes, before anything is decoded."""
    if len(parts) > MAX_MEDIA_PARTS:
        raise InputError("messages", f"{len(parts)} images and videos; the limit is {MAX_MEDIA_PARTS} a request")
    items = sum(len(p.frames) if p.frames else 1 for p in parts)
    if items > MAX_MEDIA_ITEMS:
        raise InputError("messages", f"{items} images and video frames; the limit is {MAX_MEDIA_ITEMS} a request")
    size = sum(len(p.data) + sum(len(f) for f in p.frames) for p in parts)
    if max_media_bytes is not None and size > max_media_bytes:
        raise InputError("messages", f"{size} bytes of images and videos exceed the limit of {max_media_bytes} "
                                     "bytes (gateway.max_media_bytes)")


def process(processor, parts: list[MediaPart], max_tokens: int | None = None,
            max_media_bytes: int | None = None) -> list:
    """Each part through the checkpoint's processor: an image -> MediaItem, a video -> Video (its frames). The
    soft tokens and frames are counted as they come, so a request past a limit stops at once (its remaining parts
    are never decoded)."""
    check_parts(parts, max_media_bytes)
    cap = MAX_MEDIA_TOKENS if max_tokens is None else min(MAX_MEDIA_TOKENS, max_tokens)
    out, tokens, items = [], 0, 0
    for p in parts:
        if p.kind == "image":
            got = processor.image(p.data, p.where, p.budget)
            tokens, items = tokens + got.soft_tokens, items + 1
        else:
            got = (processor.frames(list(p.frames), p.where, p.budget, p.fps) if p.frames
                   else processor.video(p.data, p.where, p.budget, p.fps or 1.0))
            tokens, items = tokens + sum(f.soft_tokens for f in got.frames), items + len(got.frames)
        if tokens > cap:
            raise InputError(p.where, f"brings the images' and videos' soft tokens to {tokens}, past the limit of "
                                      f"{cap} a request; use a smaller visual_token_budget or fewer frames")
        if items > MAX_MEDIA_ITEMS:
            raise InputError(p.where, f"brings the images and video frames to {items}, past the limit of "
                                      f"{MAX_MEDIA_ITEMS} a request")
        out.append(got)
    return out
