"""The chat core on the gRPC API: ChatRequest -> a checked Conversation and its prompt ids, and a reply's committed
blocks -> ChatDelta messages and the final ChatResponse."""

from __future__ import annotations

import json

from dgserve.model.errors import InputError
from dgserve_client.v1 import dgserve_pb2 as pb

from ..detok import Detokenizer
from .messages import Conversation, parse_conversation, prompt_of
from .reply import ReplyParser, ToolCall


def conversation_from(msg: pb.ChatRequest, max_text_bytes: int) -> Conversation:
    """Byte limits first (before anything is parsed or rendered), then the chat core's checks."""
    total = sum(len(m.content) + sum(len(c.arguments_json) for c in m.tool_calls)
                + sum(len(p.text) for p in m.parts) for m in msg.messages)
    total += sum(len(t.description) + len(t.parameters_json) for t in msg.tools)
    if total > max_text_bytes:
        raise InputError("messages", f"{total} characters of messages and tools exceed the limit of "
                                     f"{max_text_bytes} bytes (gateway.max_text_bytes)")
    tools = []
    for i, t in enumerate(msg.tools):
        try:
            params = json.loads(t.parameters_json) if t.parameters_json else {"type": "object", "properties": {}}
        except json.JSONDecodeError as e:
            raise InputError(f"tools[{i}].parameters_json", f"is not valid JSON ({e.msg})") from None
        tools.append({"type": "function", "function": {"name": t.name, "description": t.description,
                                                       "parameters": params}})
    messages = [{"role": m.role, "content": _content(m, i), "tool_call_id": m.tool_call_id or None,
                 "tool_calls": [{"id": c.id, "type": "function",
                                 "function": {"name": c.name, "arguments": c.arguments_json}} for c in m.tool_calls]
                 or None} for i, m in enumerate(msg.messages)]
    return parse_conversation(messages, tools, msg.thinking, parts_field="parts")


def _content(m: pb.ChatMessage, i: int):
    """A message's content for the chat core: its text, or its parts (text, images, videos) in order."""
    if not m.parts:
        return m.content
    if m.content:
        raise InputError(f"messages[{i}].content", "give the text in content or in parts, not both")
    out = []
    for p in m.parts:
        which = p.WhichOneof("part")
        if which == "image":
            out.append({"type": "image", "data": p.image.data,
                        "visual_token_budget": p.image.visual_token_budget or None})
        elif which == "video":
            out.append({"type": "video", "data": p.video.data, "frames": list(p.video.frames),
                        "fps": p.video.fps or None, "visual_token_budget": p.video.visual_token_budget or None})
        else:
            out.append({"type": "text", "text": p.text})
    return out


def chat_prompt(tokenizer, processor, msg: pb.ChatRequest, max_text_bytes: int, max_tokens: int,
                max_media_bytes: int | None = None) -> tuple[list[int], tuple]:
    """The request's prompt ids and processed images (slow for long histories and big images: the gateway runs it
    off its event loop)."""
    return prompt_of(tokenizer, processor, conversation_from(msg, max_text_bytes), max_tokens, max_media_bytes)


def _calls(calls: list[ToolCall]) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments_json) for c in calls]


class ChatTurn:
    """One reply as it streams: the committed blocks' text with its special tokens, through a ReplyParser."""

    def __init__(self, tokenizer, pad: int | None, request_id: str):
        self.text = Detokenizer(tokenizer, pad, skip_special_tokens=False)
        self.parser = ReplyParser(request_id)

    def block(self, index: int, token_ids) -> pb.ChatDelta:
        return self._delta(index, self.parser.feed(self.text.feed(token_ids)))

    def _delta(self, index: int, pieces) -> pb.ChatDelta:
        d = pb.ChatDelta(block=index)
        for p in pieces:
            if p.kind == "thinking":
                d.reasoning += p.text
            elif p.kind == "tool_call":
                d.tool_calls.extend(_calls([p.call]))
            else:
                d.content += p.text
        return d

    def final(self, event, request_id: str, usage: pb.Usage, stats: pb.Stats) -> tuple[pb.ChatDelta, pb.ChatResponse]:
        """What the end of the stream releases, and the whole reply."""
        tail = self._delta(len(event.stats.steps_per_block), self.parser.finish())
        r = self.parser.reply
        reason = "tool_calls" if r.tool_calls else ("stop" if event.finish_reason == "eos" else "length")
        return tail, pb.ChatResponse(request_id=request_id, content=r.content, reasoning=r.thinking,
                                     tool_calls=_calls(r.tool_calls), finish_reason=reason, usage=usage,
                                     stats=stats, token_ids=event.token_ids, malformed_tool_calls=r.malformed_calls)
