"""Chat requests, checked and rendered: messages with roles system, user, assistant and tool; tool declarations as
JSON Schema; thinking on or off. Every error is an InputError naming the field (`messages[2].tool_call_id`,
`tools[0].function.parameters`, ...).

Rendering uses the checkpoint's own chat template through its tokenizer (transformers' `apply_chat_template`;
`model/chat_template.jinja` renders MODEL_SPEC section 6 where a checkpoint has none). Earlier turns' thoughts
are not sent back to the model (the model card's rule): an assistant message's content is rendered without its
thought channel. A tool result is rendered under the name of the call it answers. Images and videos in user
messages (chat/media.py) are processed by the checkpoint's image processor and placed as Gemma4Processor places
them (model/media.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from dgserve.model.errors import InputError

from .media import MEDIA_TYPES, MediaPart, media_part, process
from .reply import THOUGHT_CLOSE, THOUGHT_OPEN, ToolCall

ROLES = ("system", "user", "assistant", "tool")
MEDIA_PAYLOAD = ("image_url", "video_url", "data", "frames")  # a media part's encoded bytes, not text
NAME = re.compile(r"[A-Za-z0-9_\-\.]{1,64}")
MAX_TOOLS = 128


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict

    def as_template(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class Message:
    role: str
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    parts: tuple[str | MediaPart, ...] = ()  # the content in order, when it holds images or videos


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    tools: tuple[Tool, ...] = ()
    thinking: bool = False
    names: dict[str, str] = field(default_factory=dict)  # tool call id -> tool name

    def media(self) -> list[MediaPart]:
        """The images and videos, in the order the template renders them."""
        return [p for m in self.messages for p in m.parts if isinstance(p, MediaPart)]

    def template_messages(self) -> list[dict]:
        out = []
        for m in self.messages:
            if m.parts:
                out.append({"role": m.role, "content": [{"type": "text", "text": p} if isinstance(p, str)
                                                        else {"type": p.kind} for p in m.parts]})
            elif m.role == "assistant":
                calls = [{"function": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls]
                out.append({"role": "assistant", "content": strip_thoughts(m.content), "tool_calls": calls})
            elif m.role == "tool":
                out.append({"role": "tool", "name": self.names[m.tool_call_id], "content": m.content})
            else:
                out.append({"role": m.role, "content": m.content})
        return out


def strip_thoughts(text: str) -> str:
    """An earlier answer without its thought channel."""
    while THOUGHT_OPEN in text:
        start = text.index(THOUGHT_OPEN)
        end = text.find(THOUGHT_CLOSE, start)
        text = text[:start] + (text[end + len(THOUGHT_CLOSE):] if end >= 0 else "")
    return text


def _content(value, field_name: str, role: str) -> tuple[str, tuple[str | MediaPart, ...]]:
    """A message's content: its text, and its parts in order when it holds images or videos (user messages)."""
    if not isinstance(value, list):
        return _text(value, field_name), ()
    parts: list[str | MediaPart] = []
    for j, part in enumerate(value):
        where = f"{field_name}[{j}]"
        if not isinstance(part, dict):
            raise InputError(where, "a content part must be an object with a type")
        if part.get("type") == "text":
            parts.append(_text(part.get("text"), f"{where}.text"))
        elif part.get("type") in MEDIA_TYPES and role != "user":
            raise InputError(where, f"images and videos go in user messages, not {role} messages")
        else:
            parts.append(media_part(part, where))
    text = "".join(p for p in parts if isinstance(p, str))
    return text, tuple(parts) if any(isinstance(p, MediaPart) for p in parts) else ()


def _text(value, field_name: str) -> str:
    """A content value (a string, or a list of text parts) as a valid UTF-8 string."""
    if value is None:
        return ""
    if isinstance(value, list):
        return _content(value, field_name, "text-only")[0]
    if not isinstance(value, str):
        raise InputError(field_name, f"must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(field_name, f"is not valid UTF-8 (character {e.start})") from None
    return value


def parse_tools(raw) -> tuple[Tool, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
        raise InputError("tools", f"must be a list of at most {MAX_TOOLS} tool declarations")
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    out, seen = [], set()
    for i, t in enumerate(raw):
        f = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(f, dict):
            raise InputError(f"tools[{i}]", "must be {\"type\": \"function\", \"function\": {\"name\": ...}}")
        name = f.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise InputError(f"tools[{i}].function.name", "must be 1-64 letters, digits, '_', '-' or '.'")
        if name in seen:
            raise InputError(f"tools[{i}].function.name", f"{name!r} is declared twice")
        seen.add(name)
        params = f.get("parameters", {"type": "object", "properties": {}})
        try:
            if not isinstance(params, dict):
                raise SchemaError(f"{type(params).__name__} is not a JSON Schema object")
            validator_for(params).check_schema(params)
        except SchemaError as e:
            raise InputError(f"tools[{i}].function.parameters", f"is not a valid JSON Schema: {e.message}") from None
        if params.get("type", "object") != "object":
            raise InputError(f"tools[{i}].function.parameters", "must describe an object (\"type\": \"object\")")
        out.append(Tool(name, _text(f.get("description", ""), f"tools[{i}].function.description"), params))
    return tuple(out)


def _calls(raw, i: int) -> tuple[ToolCall, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InputError(f"messages[{i}].tool_calls", "must be a list")
    out = []
    for j, c in enumerate(raw):
        where = f"messages[{i}].tool_calls[{j}]"
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(c.get("id"), str) or not c["id"]:
            raise InputError(where, "must be {\"id\": ..., \"type\": \"function\", \"function\": {\"name\", "
                                    "\"arguments\"}}")
        args = f.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise InputError(f"{where}.function.arguments", f"is not valid JSON ({e.msg})") from None
        if not isinstance(args, dict):
            raise InputError(f"{where}.function.arguments", "must be a JSON object")
        name = f.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise InputError(f"{where}.function.name", "must be 1-64 letters, digits, '_', '-' or '.'")
        out.append(ToolCall(c["id"], name, args))
    return tuple(out)


def text_chars(value) -> int:
    """Characters of text in a JSON value (its strings, keys included), counted before anything is parsed. Image
    and video parts are not text (their size is bounded by the message limit)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict) and value.get("type") in MEDIA_TYPES and "role" not in value:
        return sum(len(k) + text_chars(v) for k, v in value.items() if k not in MEDIA_PAYLOAD)
    if isinstance(value, dict):
        return sum(len(k) + text_chars(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(text_chars(v) for v in value)
    return 0


def check_size(raw_messages, raw_tools, max_text_bytes: int) -> None:
    """Refuses messages and tools with more text than the limit, before they are checked or rendered."""
    total = text_chars(raw_messages) + text_chars(raw_tools)
    if total > max_text_bytes:
        raise InputError("messages", f"{total} characters of messages and tools exceed the limit of "
                                     f"{max_text_bytes} bytes (gateway.max_text_bytes)")


def parse_conversation(raw_messages, raw_tools=None, thinking: bool = False,
                       parts_field: str = "content") -> Conversation:
    """Checks a chat request: roles, order, tool calls and the results that answer them, tool schemas.
    `parts_field`: what the API calls a message's list of content parts (errors name it)."""
    if not isinstance(raw_messages, list) or not raw_messages:
        raise InputError("messages", "must be a non-empty list")
    tools = parse_tools(raw_tools)
    messages, names = [], {}
    for i, m in enumerate(raw_messages):
        if not isinstance(m, dict):
            raise InputError(f"messages[{i}]", "must be an object with a role")
        role = m.get("role")
        if role not in ROLES:
            raise InputError(f"messages[{i}].role", f"{role!r} is not one of {' | '.join(ROLES)}")
        if role == "system" and i != 0:
            raise InputError(f"messages[{i}].role", "a system message can only be the first")
        raw = m.get("content")
        content, parts = _content(raw, f"messages[{i}].{parts_field if isinstance(raw, list) else 'content'}", role)
        if parts:
            messages.append(Message(role, content, parts=parts))
        elif role == "assistant":
            calls = _calls(m.get("tool_calls"), i)
            names |= {c.id: c.name for c in calls}
            messages.append(Message(role, content, calls))
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if not names:
                raise InputError(f"messages[{i}]", "a tool result without an earlier assistant tool call")
            if call_id not in names:
                raise InputError(f"messages[{i}].tool_call_id", f"{call_id!r} answers no earlier tool call "
                                                                f"(known: {', '.join(sorted(names))})")
            messages.append(Message(role, content, tool_call_id=call_id))
        else:
            messages.append(Message(role, content))
    if messages[-1].role == "assistant" and not messages[-1].tool_calls:
        raise InputError(f"messages[{len(messages) - 1}].role", "the last message must be from the user or a tool "
                                                                "(the reply is the model's)")
    return Conversation(tuple(messages), tools, bool(thinking), names)


def render_ids(tokenizer, conv: Conversation, max_tokens: int | None = None, media: list | None = None) -> list[int]:
    """The conversation through the checkpoint's chat template, tokenized, with the model turn opened; a history
    longer than `max_tokens` is refused. `media`: its images and videos processed (`prompt_of`)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise InputError("messages", "this checkpoint has no tokenizer or chat template; send token ids")
    tools = [t.as_template() for t in conv.tools] or None
    if media:
        from dgserve.model.media import MediaItem, expand_prompt
        from dgserve.model.tokenizer import media_tokens

        text = tokenizer.apply_chat_template(conv.template_messages(), tools=tools, add_generation_prompt=True,
                                             tokenize=False, enable_thinking=conv.thinking)
        text = expand_prompt(text, [m for m in media if isinstance(m, MediaItem)],
                             [m for m in media if not isinstance(m, MediaItem)], media_tokens(tokenizer))
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        out = tokenizer.apply_chat_template(conv.template_messages(), tools=tools, add_generation_prompt=True,
                                            tokenize=True, enable_thinking=conv.thinking)
        ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    if max_tokens is not None and len(ids) > max_tokens:
        raise InputError("messages", f"the conversation is {len(ids)} tokens with its template; the limit is "
                                     f"{max_tokens}")
    return ids


def prompt_of(tokenizer, processor, conv: Conversation, max_tokens: int | None = None,
              max_media_bytes: int | None = None) -> tuple[list[int], tuple]:
    """The prompt ids and the engine's media (every image, then each video's frames, in prompt order)."""
    parts = conv.media()
    if parts and processor is None:
        raise InputError(parts[0].where, "this endpoint's checkpoint cannot read images (no vision tower)")
    processed = process(processor, parts, max_tokens, max_media_bytes) if parts else []
    ids = render_ids(tokenizer, conv, max_tokens, processed)
    flat = []
    for m in processed:
        flat.extend(getattr(m, "frames", [m]))
    return ids, tuple(flat)
