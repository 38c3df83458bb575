"""Response bodies in OpenAI's shapes, built from the gateway's typed messages (pb.ChatResponse, pb.ChatDelta,
pb.GenerateResponse), so the HTTP and gRPC APIs give the same reply for the same tokens."""

from __future__ import annotations

import json

from dgserve_client.v1 import dgserve_pb2 as pb

DONE = "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(u: pb.Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}}


def tool_call(c: pb.ToolCall, index: int | None = None) -> dict:
    out = {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
    return out if index is None else {"index": index, **out}


def finish_reason(reason: str) -> str:
    """The engine's "eos" is OpenAI's "stop"; "length" and "tool_calls" keep their names."""
    return "stop" if reason == "eos" else reason


class Head:
    """What every body of one response repeats."""

    def __init__(self, kind: str, request_id: str, model: str, created: int):
        self.id, self.model, self.created = f"{kind}-{request_id}", model, created

    def body(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}


def chat_completion(head: Head, r: pb.ChatResponse, token_ids: bool) -> dict:
    message = {"role": "assistant", "content": r.content or (None if r.tool_calls else ""),
               "reasoning_content": r.reasoning or None, "tool_calls": [tool_call(c) for c in r.tool_calls] or None}
    choice = {"index": 0, "message": message, "finish_reason": r.finish_reason, "logprobs": None}
    if r.malformed_tool_calls:
        choice["malformed_tool_calls"] = r.malformed_tool_calls  # calls that did not parse came back as content
    if token_ids:
        choice["token_ids"] = list(r.token_ids)
    return head.body("chat.completion", [choice], usage=usage(r.usage))


def chat_chunk(head: Head, delta: dict, finish: str | None = None, **extra) -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    return sse(head.body("chat.completion.chunk", [choice], **extra))


def chat_delta(d: pb.ChatDelta, calls_before: int) -> dict:
    """A block's delta; tool calls are numbered across the stream (OpenAI's `index`)."""
    out = {}
    if d.reasoning:
        out["reasoning_content"] = d.reasoning
    if d.content:
        out["content"] = d.content
    if d.tool_calls:
        out["tool_calls"] = [tool_call(c, calls_before + i) for i, c in enumerate(d.tool_calls)]
    return out


def completion(head: Head, r: pb.GenerateResponse, text: str, token_ids: bool) -> dict:
    choice = {"index": 0, "text": text, "finish_reason": finish_reason(r.finish_reason), "logprobs": None}
    if token_ids:
        choice["token_ids"] = list(r.token_ids)
    return head.body("text_completion", [choice], usage=usage(r.usage))


def completion_chunk(head: Head, text: str, finish: str | None = None, **extra) -> str:
    return sse(head.body("text_completion", [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
                         **extra))


def models(model_id: str, created: int, context_length: int) -> dict:
    return {"object": "list", "data": [model(model_id, created, context_length)]}


def model(model_id: str, created: int, context_length: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "dgserve",
            "max_model_len": context_length}
