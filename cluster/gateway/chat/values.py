"""The Gemma 4 tool-call value syntax (MODEL_SPEC section 6) to and from JSON values.

`{key:<|"|>text<|"|>,n:5,flag:true,obj:{a:<|"|>x<|"|>},items:[1,2]}`: strings between `<|"|>` quotes, bare
numbers, true / false / null, objects with bare keys, arrays. `parse_object` reads a call's arguments; a
malformed one raises ValueError naming the position (the parser reports it as text, never crashes).
"""

from __future__ import annotations

import json
import re

QUOTE = '<|"|>'
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_KEY = re.compile(r"[A-Za-z0-9_\-\.]+")


class _Reader:
    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def fail(self, what: str):
        raise ValueError(f"{what} at character {self.pos} of {self.text[:80]!r}")

    def take(self, s: str) -> bool:
        if self.text.startswith(s, self.pos):
            self.pos += len(s)
            return True
        return False

    def expect(self, s: str) -> None:
        if not self.take(s):
            self.fail(f"expected {s!r}")

    def value(self):
        if self.take(QUOTE):
            end = self.text.find(QUOTE, self.pos)
            if end < 0:
                self.fail("an unterminated string")
            out, self.pos = self.text[self.pos:end], end + len(QUOTE)
            return out
        if self.text.startswith("{", self.pos):
            return self.object()
        if self.take("["):
            items = []
            while not self.take("]"):
                if items:
                    self.expect(",")
                items.append(self.value())
            return items
        for word, v in (("true", True), ("false", False), ("null", None)):
            if self.take(word):
                return v
        m = _NUMBER.match(self.text, self.pos)
        if not m:
            self.fail("expected a value")
        self.pos = m.end()
        return json.loads(m.group())

    def object(self) -> dict:
        self.expect("{")
        out: dict = {}
        while not self.take("}"):
            if out:
                self.expect(",")
            m = _KEY.match(self.text, self.pos)
            if not m:
                self.fail("expected a key")
            self.pos = m.end()
            self.expect(":")
            out[m.group()] = self.value()
        return out


def parse_object(text: str) -> dict:
    """`{k:v,...}` (the whole text) -> a dict of JSON values."""
    r = _Reader(text)
    out = r.object()
    if r.pos != len(text):
        r.fail("unexpected text after the object")
    return out


def parse_call(text: str) -> tuple[str, dict]:
    """`call:NAME{...}` -> (name, arguments)."""
    if not text.startswith("call:"):
        raise ValueError(f"a tool call starts with 'call:', got {text[:40]!r}")
    brace = text.find("{")
    if brace < 0:
        raise ValueError(f"a tool call has no arguments object: {text[:80]!r}")
    name = text[len("call:"):brace]
    if not re.fullmatch(r"[A-Za-z0-9_\-\.]{1,64}", name):
        raise ValueError(f"invalid tool name {name!r}")
    return name, parse_object(text[brace:])
