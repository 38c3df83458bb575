"""A reply's text as its committed blocks arrive: each block's ids are decoded with everything before them, so a
character split across two blocks comes out whole, once."""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, pad: int | None, skip_special_tokens: bool):
        self.tokenizer, self.pad, self.skip = tokenizer, pad, skip_special_tokens
        self.ids: list[int] = []
        self.text = ""

    def feed(self, token_ids) -> str:
        """The text the new ids add (pad ids dropped)."""
        self.ids += [t for t in token_ids if t != self.pad]
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        # the decoded text only grows, except where a character split across blocks completes
        common = len(self.text) if text.startswith(self.text) else len(self.text.rstrip("\ufffd"))
        new, self.text = text[common:], text
        return new
