"""Output processing: token events become text on the way out of the engine, after the driver.

The driver only ever deals in token ids. A request's stream applies its `Detokenizer` as a consumer takes each
event (the rank's asyncio loop, the batch writer), so decoding never runs inside the scheduling loop.
"""

from __future__ import annotations

from dataclasses import replace

from . import events as ev


class Detokenizer:
    """Adds `text` to committed blocks (that block's tokens) and to the final event (all tokens), dropping the
    padding after EOS."""

    def __init__(self, tokenizer, pad_token_id: int | None):
        self.tokenizer, self.pad = tokenizer, pad_token_id

    def __call__(self, event: ev.Event) -> ev.Event:
        if isinstance(event, ev.BlockCommitted | ev.Finished) and event.text is None:
            return replace(event, text=self.text(event.token_ids))
        return event

    def text(self, ids) -> str:
        from dgserve.model.tokenizer import decode

        return decode(self.tokenizer, list(ids), self.pad)
