"""Fuzzing the OpenAI-compatible routes through Ray Serve's HTTP proxy, in front of the real endpoint (the tiny
model on an engine unit; tests/cluster/gateway/conftest.py), with hypothesis-generated bodies: plausible chats
and completions with random knobs, tool rounds and streams, and anything else (wrong types, unknown roles and
fields, broken schemas, invalid UTF-8, bytes that are not JSON, unknown routes), CONCURRENCY calls at once.

The oracle is the server's own rules applied here, in this process: a body must get 400 (naming the same field)
exactly when the schema or the chat core refuses it, 404 for a model or route this server does not have, and
otherwise 200 with a well-formed completion (or a stream that ends with `[DONE]`); nothing may be a 5xx. After
the fuzz the endpoint is healthy and a fixed request gives the same tokens as before it.
`DGSERVE_FUZZ_HTTP_REQUESTS` sets the count (default 80)."""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from .test_http import request

REQUESTS = int(os.environ.get("DGSERVE_FUZZ_HTTP_REQUESTS", "80"))
BATCH, CONCURRENCY = 8, 4
BUSY = {429, 504}  # load-dependent answers any request may get
ROLES = ["system", "developer", "user", "assistant", "tool", "model", "", "User"]
SCHEMAS = [{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}, {},
           {"type": "string"}, {"type": 5}, [], "{}", {"properties": {"a": {"type": "strng"}}}]
json_leaf = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=12)
any_json = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3) |
                        st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
small_text = st.text(min_size=1, max_size=30)


@st.composite
def knobs(draw, plausible: bool) -> dict:
    out = {}
    for name, good in (("max_tokens", st.integers(1, 64)), ("max_denoising_steps", st.integers(1, 4)),
                       ("entropy_bound", st.floats(0.01, 5)), ("t_min", st.floats(0, 0.5)),
                       ("t_max", st.floats(0.5, 2)), ("stability_threshold", st.integers(0, 8)),
                       ("confidence_threshold", st.floats(0.001, 1)), ("seed", st.integers(0, 2**63 - 1))):
        if draw(st.integers(0, 2)) == 0:
            out[name] = draw(good if plausible else good | any_json)
    out.setdefault("max_tokens", 32)  # short generations keep the fuzz quick
    out.setdefault("max_denoising_steps", 2)
    return out


@st.composite
def chat_bodies(draw) -> dict:
    plausible = draw(st.booleans())
    if plausible:
        messages = [{"role": "user", "content": draw(small_text)}]
        body = {"model": "tiny", "messages": messages}
        if draw(st.booleans()):
            messages += [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                          "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": draw(st.text(max_size=20))}]
            body["tools"] = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMAS[0]}}]
        if draw(st.booleans()):
            body["reasoning_effort"] = draw(st.sampled_from(["none", "low", "high"]))
    else:
        messages = [{"role": draw(st.sampled_from(ROLES) | any_json), "content": draw(small_text | any_json),
                     **draw(st.dictionaries(st.sampled_from(["tool_call_id", "tool_calls", "name"]), any_json,
                                            max_size=2))} for _ in range(draw(st.integers(0, 3)))]
        body = {"model": draw(st.sampled_from(["tiny", "gpt-4o", ""]) | any_json),
                "messages": draw(st.just(messages) | any_json)}
        if draw(st.booleans()):
            body["tools"] = [{"type": "function", "function": {"name": draw(st.sampled_from(["f", "bad name"])),
                                                                "parameters": draw(st.sampled_from(SCHEMAS))}}]
        body |= draw(st.dictionaries(st.sampled_from(["tool_choice", "temperature", "n", "stop", "frobnicate",
                                                      "chat_template_kwargs", "stream_options"]), any_json,
                                     max_size=2))
    body |= draw(knobs(plausible))
    if draw(st.booleans()):
        body["stream"] = True
    return body


@st.composite
def completion_bodies(draw) -> dict:
    plausible = draw(st.booleans())
    prompt = draw(small_text | st.lists(st.integers(0, 1023), min_size=1, max_size=12) if plausible
                  else any_json | st.lists(st.integers(-5, 5000), max_size=4))
    body = {"model": "tiny", "prompt": prompt, **draw(knobs(plausible))}
    if draw(st.booleans()):
        body["stream"] = True
    return body


BAD_UTF8 = b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff"}]}'
calls = st.one_of(
    st.tuples(st.just("/chat/completions"), chat_bodies()),
    st.tuples(st.just("/completions"), completion_bodies()),
    st.tuples(st.sampled_from(["/chat/completions", "/completions"]),
              st.binary(max_size=40) | st.just(BAD_UTF8)),
    st.tuples(st.sampled_from(["/models", "/models/tiny", "/nope", "/chat/completion"]), st.none()),
)


class Oracle:
    """The answer the server must give, from its own schema and chat core run here."""

    def __init__(self, tiny_dir, topo):
        from dgserve.cluster.gateway.front import load_front
        from dgserve.cluster.gateway.http.service import OpenAIService

        self.service = OpenAIService(load_front(topo), unit=None)

    def expect(self, path: str, body) -> tuple[int, str | None]:
        from pydantic import ValidationError

        from dgserve.cluster.gateway.http.errors import ApiError, from_validation
        from dgserve.cluster.gateway.http.schema import ChatCompletionRequest, CompletionRequest

        if body is None:
            return (200 if path in ("/models", "/models/tiny") else 404), None
        if isinstance(body, bytes):
            try:
                body = json.loads(body)
            except ValueError:
                return 400, None
        if not isinstance(body, dict):
            return 400, None
        try:
            parsed = (ChatCompletionRequest if path == "/chat/completions" else CompletionRequest).model_validate(body)
        except ValidationError as e:
            return 400, from_validation(e).param
        try:
            asyncio.run(self.service._prepare(parsed, "r", ""))
        except ApiError as e:
            return e.status, e.param
        return 200, None


def send(base: str, path: str, body) -> tuple[int, dict, object]:
    import urllib.error
    import urllib.request

    if body is None:
        return request(f"{base}{path}")
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{base}{path}", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read().decode()
            return r.status, dict(r.headers), raw
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def check(path: str, body, got, want) -> list[str]:
    status, headers, raw = got
    want_status, want_param = want
    problems = []
    if status >= 500 and status not in BUSY:
        return [f"{status}: {raw[:300]}"]
    if status in BUSY:
        return []
    if status != want_status:
        return [f"status {status}, expected {want_status}: {str(raw)[:300]}"]
    if status != 200:
        err = (raw if isinstance(raw, dict) else json.loads(raw)).get("error", {})
        if set(err) != {"message", "type", "param", "code"} or not err["message"]:
            problems.append(f"an error body not in OpenAI's shape: {raw}")
        if want_param is not None and err.get("param") != want_param:
            problems.append(f"param {err.get('param')!r}, expected {want_param!r}")
        return problems
    if body is None:
        return []
    if isinstance(body, dict) and body.get("stream"):
        events = [line[6:] for line in raw.split("\n\n") if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]" or any('"error"' in e[:10] for e in events):
            problems.append(f"a stream that did not end with [DONE] alone: {raw[-300:]}")
        return problems
    out = raw if isinstance(raw, dict) else json.loads(raw)
    u = out.get("usage", {})
    if not out.get("choices") or u.get("total_tokens") != u.get("prompt_tokens", 0) + u.get("completion_tokens", 0):
        problems.append(f"a response without choices or with inconsistent usage: {str(out)[:300]}")
    return problems


def fixed(base: str) -> list[int]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "seed": 12, "max_tokens": 64,
            "max_denoising_steps": 4, "return_token_ids": True}
    return request(f"{base}/chat/completions", body)[2]["choices"][0]["token_ids"]


def test_fuzz_the_http_routes(endpoint, http_base, tiny_dir, capsys):
    _, _, topo = endpoint
    before = fixed(http_base)
    oracle = Oracle(tiny_dir, topo)
    statuses: Counter[int] = Counter()
    problems: dict[str, list[str]] = {}
    pool = ThreadPoolExecutor(CONCURRENCY)

    @settings(max_examples=math.ceil(REQUESTS / BATCH), deadline=None, database=None, phases=[Phase.generate],
              derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.lists(calls, min_size=BATCH, max_size=BATCH))
    def fuzz(batch):
        futures = [(path, body, pool.submit(send, http_base, path, body)) for path, body in batch]
        for path, body, f in futures:
            got = f.result()
            statuses[got[0]] += 1
            for p in check(path, body, got, oracle.expect(path, body)):
                problems.setdefault(p[:80], []).append(f"{p}\n      POST {path} {str(body)[:300]}")

    fuzz()
    pool.shutdown()
    with capsys.disabled():
        print(f"\nHTTP fuzz: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    assert not problems, "\n".join(f"{k}: {len(v)}x\n    " + "\n    ".join(v[:3]) for k, v in problems.items())
    assert request(f"{http_base[:-3]}/health")[0] == 200
    assert fixed(http_base) == before
