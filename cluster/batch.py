"""`dgserve generate --prompts-file FILE`: many prompts through the engine at once, one JSON line each.

FILE is JSON Lines; each non-blank line is an object with `prompt` (text; the chat template is applied) or
`prompt_ids` (token ids), and optionally `seed`, `thinking`, `request_id`, `drafts` (ignored here) and any sampler
knob (`max_new_tokens`, `max_denoising_steps`, `entropy_bound`, `t_min`, `t_max`, `stability_threshold`,
`confidence_threshold`). Knobs given on the command line are the defaults for every line. Every line is checked
before anything runs; a bad line is an error naming the line and the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from dgserve.model.errors import DGServeError, InputError
from dgserve.model.sampler import KNOBS, SamplerSettings
from dgserve.model.validate import is_int

from .engine import Engine, EngineConfig, EngineRequest
from .engine.events import Failed, Finished

FIELDS = {"prompt", "prompt_ids", "seed", "thinking", "request_id", *KNOBS}


class BatchFileError(DGServeError):
    pass


def read_requests(path: Path, defaults: dict, generation, tokenizer,
                  chat_ids: Callable) -> list[tuple[str, EngineRequest]]:
    """(where, request) per non-blank line; `where` is 'FILE line N' for messages."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise InputError("prompts_file", f"cannot read {path}: {e.strerror}") from e
    out = []
    for no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{path} line {no}",
                        _request(json.loads(line), defaults, generation, tokenizer, chat_ids, len(out))))
        except json.JSONDecodeError as e:
            raise BatchFileError(f"{path} line {no}: not a JSON object ({e.msg})") from e
        except DGServeError as e:
            raise BatchFileError(f"{path} line {no}: {e}") from e
    if not out:
        raise InputError("prompts_file", f"{path} holds no requests")
    return out


def _request(obj, defaults: dict, generation, tokenizer, chat_ids: Callable, index: int) -> EngineRequest:
    if not isinstance(obj, dict):
        raise InputError("line", "must be a JSON object")
    unknown = sorted(set(obj) - FIELDS)
    if unknown:
        raise InputError(unknown[0], f"unknown field; allowed: {sorted(FIELDS)}")
    if ("prompt" in obj) == ("prompt_ids" in obj):
        raise InputError("prompt", "give exactly one of prompt (text) or prompt_ids")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise InputError("prompt", "must be a string")
        ids = chat_ids(tokenizer, obj["prompt"], enable_thinking=bool(obj.get("thinking", False)))
    else:
        ids = obj["prompt_ids"]
        if not isinstance(ids, list) or not all(map(is_int, ids)):
            raise InputError("prompt_ids", "must be a list of integer token ids")
    knobs = {k: obj.get(k, defaults.get(k)) for k in KNOBS}
    settings = SamplerSettings.from_defaults(generation, **knobs)
    return EngineRequest(ids, settings, seed=obj.get("seed", defaults.get("seed", 0)),
                         request_id=obj.get("request_id", f"line-{index}"))


def run_batch(engine: Engine, requests: list[tuple[str, EngineRequest]], emit: Callable[[dict], None]) -> int:
    """Submit everything (the engine validates each; nothing runs if one is refused), run, emit one object per
    request as it ends. Returns the number of requests that failed while running."""
    for where, r in requests:
        try:
            engine.check(r)
        except DGServeError as e:
            raise BatchFileError(f"{where}: {e}") from e
    streams = [(i, engine.submit(r)) for i, (_, r) in enumerate(requests)]
    pending = dict(streams)
    failed = 0
    while pending:
        engine.step()
        for i, st in [(i, s) for i, s in pending.items() if s.done]:
            del pending[i]
            emit(_line(i, st))
            failed += isinstance(st.final, Failed)
    return failed


def _line(index: int, stream) -> dict:
    f = stream.final
    if isinstance(f, Failed):
        return {"index": index, "request_id": stream.request_id, "error": {"code": f.code.value,
                                                                          "message": f.message}}
    assert isinstance(f, Finished)
    s = f.stats
    return {"index": index, "request_id": stream.request_id, "token_ids": list(f.token_ids), "text": f.text,
            "finish_reason": f.finish_reason, "steps_per_block": list(s.steps_per_block),
            "tokens_per_forward": s.tokens_per_forward,
            "timings": {"queue_s": s.queue_s, "time_to_first_block_s": s.time_to_first_block_s,
                        "total_s": s.total_s}}


def engine_for_file(model, tokenizer, n: int, max_running: int, budget_bytes: int | None,
                    threads: int = 1) -> Engine:
    cfg = {"max_running": max_running, "max_queued": max(n, 1), "cpu_threads": threads}
    if budget_bytes is not None:
        cfg["memory_budget_bytes"] = budget_bytes
    return Engine(model, EngineConfig(**cfg), tokenizer=tokenizer)
