"""Images and video frames into what the vision tower reads, with the checkpoint's own processor files.

- Bytes (PNG, JPEG, WebP) are decoded by Pillow and checked; transformers' Gemma 4 image processor (the PIL
  backend, from the checkpoint's `preprocessor_config.json`) resizes them to the visual token budget (70, 140, 280,
  560 or 1120 soft tokens; the checkpoint's default when unset) and cuts 16x16 patches. Padding patches are
  dropped: the tower runs each image on its own patches.
- Video is a list of frames or a file decoded with PyAV and sampled at a stated rate. Each frame goes through the
  same image processor at the per-frame budget (70 by default, `video_preprocessor_config.json`). Gemma 4's own
  video processor needs torchvision, whose PyPI build is compiled against CUDA torch and fails to load beside the
  CPU torch wheel (`operator torchvision::nms does not exist`), so frames take the image processor's path; its
  resize is PIL's bicubic instead of torchvision's antialiased bicubic, which changes pixels slightly, not the
  number of soft tokens a frame gets.
- The prompt text is expanded as Gemma4Processor expands it: each `<|image|>` placeholder becomes
  `<boi>` + n soft tokens + `<eoi>`, each `<|video|>` placeholder becomes, per frame, `mm:ss <boi>` + n video soft
  tokens + `<eoi>`, joined by spaces.

Nothing here imports torch at import time (the gateway relays without it until a request carries an image).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError

BUDGETS = (70, 140, 280, 560, 1120)  # soft tokens per image the Gemma 4 processor supports
FORMATS = ("PNG", "JPEG", "WEBP", "MPO")  # MPO: a phone's multi-picture JPEG (the first picture is read)
MAX_PIXELS = 40_000_000  # larger images are refused before decoding (a decompression bomb costs no memory)
MAX_FRAMES = 32  # per video, unless the checkpoint's video processor says otherwise


# The image processor's pixel values are 8-bit codes times 1/255 (rescaled, not normalized): a float32 value is
# exactly CODE_VALUES[code]. Patches travel as the codes (a quarter of the bytes) and become floats on the rank.
CODE_VALUES = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)


@dataclass(frozen=True)
class MediaItem:
    """One image or video frame, ready for the tower: patches without padding."""

    kind: str  # "image" | "frame"
    pixels: np.ndarray  # [P, 3 * patch^2]: uint8 codes (see CODE_VALUES) or float32 values
    positions: np.ndarray  # [P, 2] int64: (x, y)
    soft_tokens: int  # P / pooling^2: the placeholder count in the prompt
    digest: str  # sha256 of the source bytes and the budget (prefix-cache keys, logs)

    @property
    def nbytes(self) -> int:
        return self.pixels.nbytes + self.positions.nbytes

    def values(self) -> np.ndarray:
        """The processor's float32 pixel values [P, 3 * patch^2]."""
        return CODE_VALUES[self.pixels] if self.pixels.dtype == np.uint8 else self.pixels


def compact(pixels: np.ndarray) -> np.ndarray:
    """float32 pixel values as their uint8 codes when that is exact (the processor only rescales), else as they
    are (a processor config that normalizes)."""
    codes = np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8)
    return codes if np.array_equal(CODE_VALUES[codes], pixels) else np.ascontiguousarray(pixels, dtype=np.float32)


@dataclass(frozen=True)
class Video:
    frames: list[MediaItem]
    timestamps: list[float]  # seconds, one per frame

    def prompt(self, boi: str, video_token: str, eoi: str) -> str:
        return " ".join(f"{int(t // 60):02d}:{int(t % 60):02d} {boi}{video_token * f.soft_tokens}{eoi}"
                        for t, f in zip(self.timestamps, self.frames, strict=True))


@dataclass
class MediaProcessor:
    """The checkpoint's image processor and video defaults (loaded once, on first use)."""

    folder: Path
    max_frames: int = MAX_FRAMES
    frame_budget: int = 70
    image_budget: int = 280
    _processor: object = field(default=None, repr=False)

    @classmethod
    def from_checkpoint(cls, folder: str | Path) -> MediaProcessor:
        folder = Path(folder)
        image_cfg = _read(folder / "preprocessor_config.json")
        video_cfg = _read(folder / "video_preprocessor_config.json")
        return cls(folder, max_frames=int(video_cfg.get("num_frames", MAX_FRAMES)),
                   frame_budget=int(video_cfg.get("max_soft_tokens", 70)),
                   image_budget=int(image_cfg.get("max_soft_tokens", 280)))

    @property
    def processor(self):
        if self._processor is None:
            if not (self.folder / "preprocessor_config.json").is_file():
                raise InputError("images", f"the checkpoint {self.folder} has no preprocessor_config.json: it "
                                           "cannot read images")
            from transformers import AutoImageProcessor

            self._processor = AutoImageProcessor.from_pretrained(self.folder, backend="pil")
        return self._processor

    def budget(self, value: int | None, where: str, default: int) -> int:
        if value is None or value == 0:
            return default
        if value not in BUDGETS:
            raise InputError(where, f"a visual token budget of {value}; use one of {', '.join(map(str, BUDGETS))}")
        return int(value)

    def image(self, data: bytes, where: str, budget: int | None = None, kind: str = "image") -> MediaItem:
        """Decode and process one image; `where` names the request's part in errors."""
        n = self.budget(budget, f"{where}.budget", self.image_budget if kind == "image" else self.frame_budget)
        picture = decode_image(data, where)
        out = self.processor(images=[picture], max_soft_tokens=n, return_tensors="np")
        pixels, positions = out["pixel_values"][0], out["image_position_ids"][0]
        keep = (positions >= 0).all(axis=-1)
        digest = hashlib.sha256(data + f"|{n}".encode()).hexdigest()
        return MediaItem(kind, compact(np.asarray(pixels[keep], dtype=np.float32)),
                         np.ascontiguousarray(positions[keep], dtype=np.int64),
                         int(out["num_soft_tokens_per_image"][0]), digest)

    def frames(self, frames: Sequence[bytes], where: str, budget: int | None = None,
               fps: float | None = None) -> Video:
        """A video given as still frames taken `fps` times a second (1 when unset)."""
        rate = 1.0 if fps is None else fps
        if not (isinstance(rate, int | float) and math.isfinite(rate) and rate > 0):
            raise InputError(f"{where}.fps", f"is {fps!r}; expected a rate > 0 frames a second")
        self._check_count(len(frames), where)
        items = [self.image(f, f"{where}.frames[{i}]", budget, kind="frame") for i, f in enumerate(frames)]
        return Video(items, [i / rate for i in range(len(items))])

    def video(self, data: bytes, where: str, budget: int | None = None, fps: float = 1.0) -> Video:
        """A video file decoded with PyAV, one frame every 1/fps seconds (the first frame at or after each time)."""
        if not (isinstance(fps, int | float) and math.isfinite(fps) and fps > 0):
            raise InputError(f"{where}.fps", f"is {fps!r}; expected a sampling rate > 0 frames a second")
        pictures, times = decode_video(data, where, fps, self.max_frames)
        items = []
        for i, picture in enumerate(pictures):
            buf = io.BytesIO()
            picture.save(buf, format="PNG")
            items.append(self.image(buf.getvalue(), f"{where}.frames[{i}]", budget, kind="frame"))
        return Video(items, times)

    def _check_count(self, n: int, where: str) -> None:
        if n == 0:
            raise InputError(where, "has no frames")
        if n > self.max_frames:
            raise InputError(where, f"has {n} frames; the limit is {self.max_frames} a video")


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise InputError(path.name, f"is not valid JSON (line {e.lineno})") from e


def decode_image(data: bytes, where: str):
    """A Pillow image from PNG, JPEG or WebP bytes, read in full (the processor makes it RGB, compositing any
    transparency onto white as the reference's pipeline does); anything else, or a truncated or huge image, is
    refused naming `where`."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, bytes | bytearray) or not data:
        raise InputError(where, "is empty; expected PNG, JPEG or WebP bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                fmt, (w, h) = probe.format, probe.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(where, f"is too large an image (over {MAX_PIXELS:,} pixels)") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(where, "is not a readable image; expected PNG, JPEG or WebP bytes") from e
    if fmt not in FORMATS:
        raise InputError(where, f"is a {fmt} image; expected PNG, JPEG or WebP")
    if w * h > MAX_PIXELS:
        raise InputError(where, f"is {w} x {h} pixels; the limit is {MAX_PIXELS:,} pixels an image")
    if min(w, h) < 1:
        raise InputError(where, f"is {w} x {h} pixels")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(where, f"could not be decoded ({e}); the {fmt} data is corrupt or truncated") from e


def container_format(data: bytes) -> str | None:
    """The demuxer for a video file's bytes, from its signature: MP4/MOV, Matroska/WebM or AVI (None: another).
    Naming it keeps FFmpeg from probing formats that open other files or URLs (playlists)."""
    if len(data) >= 12 and data[4:8] == b"ftyp":
        return "mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    return None


def decode_video(data: bytes, where: str, fps: float, max_frames: int):
    """Frames (Pillow RGB) sampled every 1/fps seconds from a video file, and their times in seconds. The frame
    size and the sampled frame count are checked from the headers before anything is decoded."""
    import av

    if not data:
        raise InputError(where, "is empty; expected a video file")
    fmt = container_format(data)
    if fmt is None:
        raise InputError(where, "could not be decoded as a video: expected MP4/MOV, Matroska/WebM or AVI")
    pictures, times, next_t = [], [], 0.0
    try:
        with av.open(io.BytesIO(data), format=fmt) as container:
            if not container.streams.video:
                raise InputError(where, "has no video stream")
            stream = container.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            if w * h > MAX_PIXELS:
                raise InputError(where, f"has {w} x {h} frames; the limit is {MAX_PIXELS:,} pixels a frame")
            seconds = container.duration / av.time_base if container.duration else None
            if seconds is not None and math.ceil(seconds * fps - 1e-9) > max_frames:
                raise InputError(where, f"is {seconds:.1f} s long: at {fps:g} frames a second that is more than "
                                        f"{max_frames} frames, the limit a video: sample at a lower rate")
            for frame in container.decode(stream):
                t = float(frame.pts * stream.time_base) if frame.pts is not None else len(times) / fps
                if t + 1e-9 < next_t:
                    continue
                if len(pictures) == max_frames:
                    raise InputError(where, f"gives more than {max_frames} frames at {fps:g} a second; the limit "
                                            f"is {max_frames} frames a video: sample at a lower rate")
                pictures.append(frame.to_image().convert("RGB"))
                times.append(t)
                next_t = t + 1.0 / fps
    except av.error.FFmpegError as e:
        raise InputError(where, f"could not be decoded as a video ({e})") from e
    if not pictures:
        raise InputError(where, "has no decodable frames")
    return pictures, times


def expand_prompt(text: str, images: Sequence[MediaItem], videos: Sequence[Video], tokens: dict[str, str]) -> str:
    """The rendered prompt with each image and video placeholder replaced as Gemma4Processor does; `tokens`:
    image, video, boi, eoi (the tokenizer's strings). Placeholder counts must match the media given."""
    img, vid, boi, eoi = tokens["image"], tokens["video"], tokens["boi"], tokens["eoi"]
    for name, count, given in (("image", text.count(img), len(images)), ("video", text.count(vid), len(videos))):
        if count != given:
            raise InputError(f"{name}s", f"{given} given but the prompt has {count} {name} placeholder(s)")
    parts, i, v = [], 0, 0
    pos = 0
    while True:
        a, b = text.find(img, pos), text.find(vid, pos)
        nxt = min(x for x in (a, b, len(text)) if x >= 0)
        parts.append(text[pos:nxt])
        if nxt == len(text):
            break
        if nxt == a:
            parts.append(f"{boi}{img * images[i].soft_tokens}{eoi}")
            i, pos = i + 1, a + len(img)
        else:
            parts.append(videos[v].prompt(boi, vid, eoi))
            v, pos = v + 1, b + len(vid)
    return "".join(parts)


def media_spans(ids: Sequence[int], media_ids: frozenset[int]) -> list[tuple[int, int]]:
    """[start, stop) of each run of soft tokens (one image or frame each) in a prompt."""
    spans: list[tuple[int, int]] = []
    start = None
    for i, t in enumerate(ids):
        inside = t in media_ids
        if inside and (start is None or t != ids[i - 1]):
            if start is not None:
                spans.append((start, i))
            start = i
        elif not inside and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(ids)))
    return spans


def check_media(ids: Sequence[int], items: Sequence[MediaItem], media_ids: frozenset[int], image_id: int | None,
                field_name: str = "prompt_ids") -> list[tuple[int, int]]:
    """The soft-token runs of `ids`, checked against the items in order (count, length, image or frame)."""
    spans = media_spans(ids, media_ids)
    if len(spans) != len(items):
        raise InputError(field_name, f"has {len(spans)} image/video soft-token run(s) but {len(items)} image(s) "
                                     "or frame(s) were given")
    for k, ((a, b), item) in enumerate(zip(spans, items, strict=True)):
        if b - a != item.soft_tokens:
            raise InputError(field_name, f"soft-token run {k} at {a} has {b - a} tokens; its {item.kind} gives "
                                         f"{item.soft_tokens}")
        if (ids[a] == image_id) != (item.kind == "image"):
            raise InputError(field_name, f"soft-token run {k} at {a} does not match its {item.kind}")
    return spans


def chunk_bounds(length: int, chunk: int, spans: Sequence[tuple[int, int]], start: int = 0) -> list[tuple[int, int]]:
    """[a, b) prefill chunks of at most `chunk` tokens from `start`, except that a chunk never ends inside a soft-token
    run (its tokens see each other, so one pass must hold the whole run): a chunk that would ends where the run
    starts, and one that starts with a run longer than `chunk` holds the whole run. So a chunk is at most
    max(chunk, the longest run) tokens."""
    out, a = [], start
    while a < length:
        b = min(a + chunk, length)
        for s, e in spans:
            if s < b < e:
                b = s if s > a else e
        out.append((a, b))
        a = b
    return out
