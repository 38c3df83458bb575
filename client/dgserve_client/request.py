"""Request building shared by the sync and asyncio clients."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from .errors import ApiVersionMismatch
from .v1 import dgserve_pb2 as pb

API_MAJOR = 1
KNOBS = ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
         "confidence_threshold")


def build_request(prompt: str | None = None, token_ids: Sequence[int] | None = None, seed: int | None = None,
                  stream_drafts: bool = False, thinking: bool = False, **knobs) -> pb.GenerateRequest:
    """A GenerateRequest from keyword arguments (sampler knobs by name; None means the server's default)."""
    if (prompt is None) == (token_ids is None):
        raise ValueError("give exactly one of prompt (text) or token_ids")
    req = pb.GenerateRequest(stream_drafts=stream_drafts, thinking=thinking)
    if prompt is not None:
        req.text = prompt
    else:
        req.token_ids.ids.extend(int(t) for t in token_ids)
    return _seed_and_knobs(req, seed, knobs)


def _seed_and_knobs(req, seed: int | None, knobs: dict):
    """The seed (when given) and the sampler knobs set by name (None: the server's default) on a request."""
    unknown = set(knobs) - set(KNOBS)
    if unknown:
        raise ValueError(f"unknown sampler knob(s) {sorted(unknown)}; known: {list(KNOBS)}")
    if seed is not None:
        req.seed = seed
    for k, v in knobs.items():
        if v is not None:
            setattr(req.sampler, k, v)
    return req


def build_chat_request(messages: Sequence[dict], tools: Sequence[dict] | None = None, seed: int | None = None,
                       thinking: bool = False, **knobs) -> pb.ChatRequest:
    """A ChatRequest from OpenAI-shaped dicts: messages {"role", "content", "tool_calls": [{"id", "function":
    {"name", "arguments"}}], "tool_call_id"} and tools {"type": "function", "function": {"name", "description",
    "parameters"}} (arguments and parameters as dicts or JSON strings)."""
    import json

    req = pb.ChatRequest(thinking=thinking)
    for m in messages:
        content = m.get("content") or ""
        msg = req.messages.add(role=m.get("role", ""), content=content if isinstance(content, str) else "",
                               tool_call_id=m.get("tool_call_id") or "")
        if not isinstance(content, str):
            msg.parts.extend(content_part(p) for p in content)
        for c in m.get("tool_calls") or ():
            f = c.get("function", c)
            args = f.get("arguments", {})
            msg.tool_calls.add(id=c.get("id", ""), name=f.get("name", ""),
                               arguments_json=args if isinstance(args, str) else json.dumps(args))
    for t in tools or ():
        f = t.get("function", t)
        params = f.get("parameters")
        req.tools.add(name=f.get("name", ""), description=f.get("description", ""),
                      parameters_json="" if params is None else params if isinstance(params, str)
                      else json.dumps(params))
    return _seed_and_knobs(req, seed, knobs)


def metadata(request_id: str | None, extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    return [("x-request-id", request_id or uuid.uuid4().hex), *extra]


def check_api(info: pb.ModelInfo) -> None:
    major = info.api_version.split(".")[0]
    if major != str(API_MAJOR):
        import grpc

        raise ApiVersionMismatch(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"server API version {info.api_version!r}; this client speaks {API_MAJOR}.x")


def content_part(part: dict) -> pb.ContentPart:
    """A content part: {"type": "text", "text"}, {"type": "image", "data": bytes | "path": file,
    "visual_token_budget": n} or {"type": "video", "data" | "path" | "frames": [bytes], "fps": f,
    "visual_token_budget": n}."""
    kind = part.get("type")
    if kind == "text":
        return pb.ContentPart(text=part.get("text", ""))
    budget = int(part.get("visual_token_budget") or 0)
    if kind == "image":
        return pb.ContentPart(image=pb.Image(data=_bytes(part), visual_token_budget=budget))
    if kind == "video":
        frames = [bytes(f) for f in part.get("frames") or ()]
        data = b"" if frames else _bytes(part)
        return pb.ContentPart(video=pb.Video(data=data, frames=frames, fps=float(part.get("fps") or 0),
                                             visual_token_budget=budget))
    raise ValueError(f"content part type {kind!r}: expected text, image or video")


def _bytes(part: dict) -> bytes:
    if part.get("data") is not None:
        if not isinstance(part["data"], bytes | bytearray | memoryview):
            raise ValueError(f"{part['type']}: data must be bytes, got {type(part['data']).__name__}")
        return bytes(part["data"])
    if part.get("path") is not None:
        from pathlib import Path

        try:
            return Path(part["path"]).read_bytes()
        except OSError as e:
            raise ValueError(f"{part['type']}: cannot read {str(part['path'])!r} ({e.strerror})") from None
    raise ValueError(f"{part['type']}: give data (bytes) or path")
