"""The checkpoint's own tokenizer and chat template (tokenizer.json, tokenizer_config.json, chat_template.jinja)."""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import InputError

log = logging.getLogger(__name__)


def load_tokenizer(folder: str | Path):
    """The checkpoint's tokenizer through transformers, or None when the folder has no tokenizer files."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return AutoTokenizer.from_pretrained(str(folder))


def chat_prompt_ids(tokenizer, text: str, *, system: str | None = None, enable_thinking: bool = False) -> list[int]:
    """Render one user turn with the checkpoint's chat template and tokenize it."""
    if tokenizer is None:
        raise InputError("prompt", "this checkpoint has no tokenizer files; pass token ids (--prompt-ids)")
    if not text:
        raise InputError("prompt", "is empty")
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("prompt", "the checkpoint has no chat template (chat_template.jinja)")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        enable_thinking=enable_thinking)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def decode(tokenizer, ids: list[int], pad_token_id: int | None) -> str | None:
    if tokenizer is None:
        return None
    return tokenizer.decode([t for t in ids if t != pad_token_id], skip_special_tokens=True)
