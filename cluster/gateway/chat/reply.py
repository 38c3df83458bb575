"""A model reply split into thinking, answer text and tool calls, as committed blocks stream in.

The reply is the model turn's text with its special tokens (MODEL_SPEC section 6): `<|channel>thought\n...
<channel|>` holds the thinking, `<|tool_call>call:NAME{...}<tool_call|>` a call, and `<turn|>`, `<eos>` or
`<|tool_response>` end the turn. `ReplyParser.feed(text)` takes each block's text and returns what became final:
thinking and answer text as they arrive (a marker that may still be completing by the next block is held back),
a tool call once, when its closing marker arrives, with arguments parsed to JSON. A call that does not parse
comes back as answer text with `malformed=True`; nothing raises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .values import parse_call

THOUGHT_OPEN, THOUGHT_CLOSE = "<|channel>", "<channel|>"
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
ENDS = ("<turn|>", "<eos>", "<|tool_response>")
MARKERS = (THOUGHT_OPEN, THOUGHT_CLOSE, CALL_OPEN, CALL_CLOSE, *ENDS)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: dict

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass(frozen=True)
class Piece:
    """One final piece of a reply: kind is "thinking", "content" or "tool_call"."""

    kind: str
    text: str = ""
    call: ToolCall | None = None
    malformed: bool = False


@dataclass
class Reply:
    thinking: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    malformed_calls: int = 0

    def add(self, p: Piece) -> None:
        if p.kind == "thinking":
            self.thinking += p.text
        elif p.kind == "tool_call":
            self.tool_calls.append(p.call)
        else:
            self.content += p.text
            self.malformed_calls += p.malformed


def _held_back(text: str) -> int:
    """How many trailing characters could be the start of a marker (kept for the next block)."""
    for n in range(min(len(text), max(len(m) for m in MARKERS) - 1), 0, -1):
        if any(m.startswith(text[-n:]) for m in MARKERS):
            return n
    return 0


class ReplyParser:
    def __init__(self, request_id: str = "call"):
        """Text is the answer until a thought channel opens (thinking mode: the model opens it; otherwise the
        prompt already closed an empty one). Tool calls get ids `{request_id}-1`, `-2`, ..."""
        self._buf, self._mode, self._calls, self._id = "", "content", 0, request_id
        self._label = False  # just after THOUGHT_OPEN: its "thought\n" label is not thinking text
        self.ended = False
        self.reply = Reply()

    def feed(self, text: str) -> list[Piece]:
        if self.ended:
            return []
        self._buf += text
        out = self._drain(final=False)
        for p in out:
            self.reply.add(p)
        return out

    def finish(self) -> list[Piece]:
        """The end of the stream: whatever is held back is final (an unclosed call is malformed text)."""
        out = [] if self.ended else self._drain(final=True)
        self.ended = True
        for p in out:
            self.reply.add(p)
        return out

    def _emit(self, out: list[Piece], text: str) -> None:
        if not text:
            return
        kind = "thinking" if self._mode == "thinking" else "content"
        if out and out[-1].kind == kind and not out[-1].malformed:
            out[-1] = Piece(kind, out[-1].text + text)
        else:
            out.append(Piece(kind, text))

    def _drain(self, final: bool) -> list[Piece]:
        out: list[Piece] = []
        while self._buf:
            if self._label:
                if "thought\n".startswith(self._buf) and not final:
                    break  # the label may still be arriving
                self._buf, self._label = self._buf.removeprefix("thought\n"), False
                continue
            if self._mode == "call":
                end = self._buf.find(CALL_CLOSE)
                if end < 0:
                    if final:
                        out.append(Piece("content", CALL_OPEN + self._buf, malformed=True))
                        self._buf = ""
                    break
                out.append(self._call(self._buf[:end]))
                self._buf, self._mode = self._buf[end + len(CALL_CLOSE):], "content"
                continue
            hits = [(self._buf.find(m), m) for m in MARKERS]
            hits = [(i, m) for i, m in hits if i >= 0]
            if not hits:
                keep = 0 if final else _held_back(self._buf)
                self._emit(out, self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                break
            i, m = min(hits)
            self._emit(out, self._buf[:i])
            self._buf = self._buf[i + len(m):]
            if m in ENDS:
                self._buf, self.ended = "", True
                break
            if m == THOUGHT_OPEN:
                self._mode, self._label = "thinking", True
            elif m == THOUGHT_CLOSE:
                self._mode = "content"
            elif m == CALL_OPEN:
                self._mode = "call"
            elif m == CALL_CLOSE:  # a close without an open: text
                out.append(Piece("content", m, malformed=True))
        return out

    def _call(self, body: str) -> Piece:
        try:
            name, arguments = parse_call(body)
        except ValueError:
            return Piece("content", CALL_OPEN + body + CALL_CLOSE, malformed=True)
        self._calls += 1
        return Piece("tool_call", call=ToolCall(f"{self._id}-{self._calls}", name, arguments))
