"""The checkpoint's own tokenizer and chat template (tokenizer.json, tokenizer_config.json, chat_template.jinja)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from .errors import InputError
from .media import MediaItem, Video, expand_prompt

log = logging.getLogger(__name__)


def load_tokenizer(folder: str | Path):
    """The checkpoint's tokenizer through transformers, or None when the folder has no tokenizer files."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(str(folder))
    if "<|video|>" in tok.get_vocab() and "<|video|>" not in tok.all_special_tokens:
        # as Gemma4Processor does: a released tokenizer may not mark it special, and it must stay one token
        tok.add_special_tokens({"additional_special_tokens": ["<|video|>"]}, replace_extra_special_tokens=False)
    return tok


def chat_prompt_ids(tokenizer, text: str, *, system: str | None = None, enable_thinking: bool = False,
                    images: Sequence[MediaItem] = (), videos: Sequence[Video] = ()) -> list[int]:
    """Render one user turn with the checkpoint's chat template and tokenize it. Images and videos come first in
    the turn (as content parts), their placeholders expanded as Gemma4Processor expands them."""
    if tokenizer is None:
        raise InputError("prompt", "this checkpoint has no tokenizer files; pass token ids (--prompt-ids)")
    if not text:
        raise InputError("prompt", "is empty")
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("prompt", "the checkpoint has no chat template (chat_template.jinja)")
    content: str | list = text
    if images or videos:
        content = [{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos) + [{"type": "text",
                                                                                           "text": text}]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    if images or videos:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                 enable_thinking=enable_thinking)
        expanded = expand_prompt(rendered, images, videos, media_tokens(tokenizer))
        return list(tokenizer(expanded, add_special_tokens=False)["input_ids"])
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        enable_thinking=enable_thinking)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def media_tokens(tokenizer) -> dict[str, str]:
    """The image, video, begin- and end-of-image token strings (tokenizer_config.json; `<|video|>` as Gemma 4's
    processor adds it)."""
    return {"image": getattr(tokenizer, "image_token", None) or "<|image|>",
            "boi": getattr(tokenizer, "boi_token", None) or "<|image>",
            "eoi": getattr(tokenizer, "eoi_token", None) or "<image|>", "video": "<|video|>"}


def decode(tokenizer, ids: list[int], pad_token_id: int | None) -> str | None:
    if tokenizer is None:
        return None
    return tokenizer.decode([t for t in ids if t != pad_token_id], skip_special_tokens=True)
