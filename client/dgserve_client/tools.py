"""Function calling with a dgserve chat: the model asks for tools, they run here, their results go back, until the
model answers. Works with the sync client (`Client.chat`)."""

from __future__ import annotations

import json
from collections.abc import Callable

from .v1 import dgserve_pb2 as pb


def run_tool_loop(client, messages: list[dict], tools: list[dict], functions: dict[str, Callable[..., object]],
                  max_rounds: int = 8, **chat_kwargs) -> pb.ChatResponse:
    """Chat until the reply has no tool calls: each call runs `functions[name](**arguments)` and its result (as
    text, JSON for non-strings) is sent back as a tool message answering that call. `messages` grows with the
    turns. A call to an unknown function, or one that raises, is answered with the error text, so the model can
    recover. Raises RuntimeError after `max_rounds` rounds of calls."""
    for _ in range(max_rounds):
        reply = client.chat(messages, tools, **chat_kwargs)
        if not reply.tool_calls:
            return reply
        messages.append({"role": "assistant", "content": reply.content, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
            for c in reply.tool_calls]})
        for c in reply.tool_calls:
            messages.append({"role": "tool", "tool_call_id": c.id, "content": _run(functions, c)})
    raise RuntimeError(f"the model still called tools after {max_rounds} rounds")


def _run(functions: dict[str, Callable[..., object]], call: pb.ToolCall) -> str:
    fn = functions.get(call.name)
    if fn is None:
        return f"error: no tool named {call.name!r}"
    try:
        out = fn(**json.loads(call.arguments_json or "{}"))
    except Exception as e:  # the model sees the failure and may try again
        return f"error: {type(e).__name__}: {e}"
    return out if isinstance(out, str) else json.dumps(out)
