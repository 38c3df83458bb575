"""The OpenAI-compatible HTTP API (cluster/gateway/http) on a real uvicorn server in front of scripted model
outputs: the official `openai` client chats (with thinking and a tool call, streamed or not), completes, runs a
tool loop; bad bodies get 400 naming the field; keys, backpressure and draining answer as OpenAI clients expect.
The same API through Ray Serve's HTTP proxy and real engine units is in test_http_serve.py."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest
from ray.serve.exceptions import BackPressureError

from dgserve.model.tokenizer import load_tokenizer

from .http_server import serve_http
from .test_gateway import StandInUnit
from .test_tool_loop import SCRIPT, TOOLS, scripted

ASK = [{"role": "user", "content": "Weather in Paris?"}]


def request(url: str, body=None, headers: dict | None = None, method: str | None = None):
    """(status, headers, JSON body) of one call; `body` is JSON-encoded unless it is bytes."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load_tokenizer(tiny_dir)


def replies(tok, *texts):
    it = iter(texts)
    return StandInUnit(lambda: scripted(tok, next(it)))


def test_chat_with_thinking_and_a_tool_call_in_openais_shape(tiny_dir, tok):
    unit = replies(tok, SCRIPT[0])
    with serve_http(tiny_dir, unit) as (base, _):
        c = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, reasoning_effort="high", seed=5,
                                      max_tokens=64, extra_body={"max_denoising_steps": 3, "t_min": 0.2})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and r.object == "chat.completion" and r.model == "tiny"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.reasoning_content == "I need the weather."
    assert choice.message.content is None
    sent = unit.sent[0]
    assert r.usage.prompt_tokens == len(sent.prompt_ids) and r.usage.completion_tokens == len(
        [t for t in tok.encode(SCRIPT[0], add_special_tokens=False)])
    assert sent.seed == 5 and sent.sampler == {"max_new_tokens": 64, "max_denoising_steps": 3, "t_min": 0.2}
    prompt = tok.decode(list(sent.prompt_ids), skip_special_tokens=False)
    assert "declaration:get_weather" in prompt and prompt.rstrip().endswith("<|turn>model")  # thinking: no
    # empty thought channel closes the prompt


def test_the_stream_gives_the_same_reply_in_deltas_with_the_call_once(tiny_dir, tok):
    unit = replies(tok, SCRIPT[0], SCRIPT[0])
    with serve_http(tiny_dir, unit) as (base, _):
        c = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
        whole = c.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, reasoning_effort="low")
        chunks = list(c.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, reasoning_effort="low",
                                                stream=True, stream_options={"include_usage": True}))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert deltas[0].role == "assistant"
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "I need the weather."
    calls = [t for d in deltas for t in d.tool_calls or ()]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id == f"{chunks[0].id.removeprefix('chatcmpl-')}-1"
    assert calls[0].function.arguments == whole.choices[0].message.tool_calls[0].function.arguments
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_a_tool_loop_with_the_openai_client(tiny_dir, tok):
    """A model call, the tool run here, its result sent back, the final answer."""
    unit = replies(tok, *SCRIPT)
    messages = list(ASK)
    with serve_http(tiny_dir, unit) as (base, _):
        c = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
        while True:
            msg = c.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                            extra_body={"chat_template_kwargs": {"enable_thinking": True}}
                                            ).choices[0].message
            messages.append(msg.model_dump(exclude_none=True))
            if not msg.tool_calls:
                break
            for call in msg.tool_calls:
                city = json.loads(call.function.arguments)["city"]
                messages.append({"role": "tool", "tool_call_id": call.id, "content": f"sunny in {city}"})
    assert messages[-1]["content"] == "It is sunny in Paris, 21 C." and len(unit.sent) == 2
    second = tok.decode(list(unit.sent[1].prompt_ids), skip_special_tokens=False)
    assert "<|tool_response>response:get_weather" in second and "sunny in Paris" in second
    assert "I need the weather." not in second  # the first reply's thinking is not sent back


def test_completions_take_raw_text_or_ids_and_stream_the_same_text(tiny_dir, tok):
    text = "It is sunny in Paris, 21 C."
    unit = replies(tok, text, text, text)
    with serve_http(tiny_dir, unit) as (base, _):
        c = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
        one = c.completions.create(model="tiny", prompt="The weather", max_tokens=32)
        streamed = list(c.completions.create(model="tiny", prompt=[[5, 6, 7]], stream=True))
        ids = c.completions.create(model="tiny", prompt=[5, 6, 7], extra_body={"return_token_ids": True})
    assert one.choices[0].text == text and one.choices[0].finish_reason == "stop"
    assert list(unit.sent[0].prompt_ids) == tok.encode("The weather", add_special_tokens=True)  # <bos>, no template
    assert "".join(ch.choices[0].text for ch in streamed) == text
    assert list(unit.sent[1].prompt_ids) == list(unit.sent[2].prompt_ids) == [5, 6, 7]
    assert ids.choices[0].model_extra["token_ids"][:3] == tok.encode(text, add_special_tokens=False)[:3]


BAD = [  # (body changes, param, words in the message)
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "not one of"),
    ({"messages": ASK + [{"role": "tool", "tool_call_id": "c9", "content": "r"}]}, "messages[1]",
     "without an earlier assistant tool call"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "nope", "content": "r"}]},
     "messages[2].tool_call_id", "answers no earlier tool call"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
     "tools[0].function.parameters", "not a valid JSON Schema"),
    ({"messages": [{"role": "user", "content": "word " * 700}]}, "messages", "the limit is 512"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content", "not valid UTF-8"),
    ({"temperature": 0.7}, "temperature", "set t_min and t_max"),
    ({"t_max": 0.1, "t_min": 0.3}, "t_max", "> t_min"),
    ({"max_denoising_steps": 0}, "max_denoising_steps", "greater than or equal to 1"),
    ({"max_tokens": "many"}, "max_tokens", "integer"),
    ({"n": 2}, "n", "1"),
    ({"stop": ["\n"]}, "stop", "not applied"),
    ({"tool_choice": "required"}, "tool_choice", "cannot force"),
    ({"seed": -1}, "seed", "greater than or equal to 0"),
    ({"frobnicate": 1}, "frobnicate", "unknown field"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only with stream"),
]


@pytest.mark.parametrize(("change", "param", "words"), BAD, ids=[b[1] + "-" + b[2][:12] for b in BAD])
def test_bad_chat_bodies_are_400_naming_the_field(tiny_dir, tok, change, param, words):
    unit = replies(tok, "fine<turn|>")
    with serve_http(tiny_dir, unit) as (base, _):
        status, headers, body = request(f"{base}/chat/completions", {"model": "tiny", "messages": ASK, **change},
                                        {"x-request-id": "bad-1"})
        ok, _, good = request(f"{base}/chat/completions", {"model": "tiny", "messages": ASK})
    assert status == 400 and body["error"]["param"] == param, body
    assert words in body["error"]["message"] and body["error"]["type"] == "invalid_request_error"
    assert headers["x-request-id"] == "bad-1" and body["error"]["message"].startswith("request bad-1: ")
    assert ok == 200 and good["choices"][0]["message"]["content"] == "fine"  # still serving
    assert len(unit.sent) == 1  # the bad body reached no unit


def test_bodies_that_are_not_requests_are_refused_before_parsing(tiny_dir, tok):
    unit = replies(tok)
    with serve_http(tiny_dir, unit, gateway={"max_message_bytes": 4096}) as (base, _):
        url = f"{base}/chat/completions"
        assert request(url, b'{"model": "tiny", "messages": [')[2]["error"]["code"] == "invalid_json"
        assert request(url, b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}')[0] == 400
        assert "the body must be a JSON object" in request(url, [1, 2])[2]["error"]["message"]
        status, _, body = request(url, {"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]})
        assert status == 413 and body["error"]["code"] == "request_too_large" and "4096" in body["error"]["message"]
        status, _, body = request(url, {"model": "gpt-4o", "messages": ASK})
        assert status == 404 and body["error"]["param"] == "model" and "'tiny'" in body["error"]["message"]
        status, _, body = request(f"{base}/nowhere")
        assert status == 404 and body["error"]["code"] == "not_found"
        assert request(f"{base}/chat/completions", method="GET")[0] == 405
    assert unit.sent == []


def test_api_keys_guard_every_route_but_health(tiny_dir, tok, tmp_path):
    from dgserve.cluster.gateway.security import ApiKeys

    (tmp_path / "keys").write_text("k-1\nk-3\n")
    unit = replies(tok, "fine<turn|>", "fine<turn|>")
    with serve_http(tiny_dir, unit, keys=ApiKeys(str(tmp_path / "keys"), None)) as (base, _):
        assert request(f"{base[:-3]}/health")[0] == 200
        status, headers, body = request(f"{base}/models")
        assert status == 401 and body["error"]["code"] == "invalid_api_key" and headers["www-authenticate"] == "Bearer"
        with pytest.raises(openai.AuthenticationError, match="not valid"):
            openai.OpenAI(base_url=base, api_key="k-2", max_retries=0).models.list()
        c = openai.OpenAI(base_url=base, api_key="k-1", max_retries=0)
        assert [m.id for m in c.models.list()] == ["tiny"]
        assert c.chat.completions.create(model="tiny", messages=ASK).choices[0].message.content == "fine"
        other = openai.OpenAI(base_url=base, api_key="k-3", max_retries=0)
        other.completions.create(model="tiny", prompt=[5, 6])
    one, three = (r.tenant for r in unit.sent)  # each key its own tenant: cached prefixes are not shared
    assert one and three and one != three and "k-" not in one + three


def test_a_full_queue_is_429_with_retry_after_and_a_stream_that_fails_ends_with_an_error(tiny_dir, tok):
    from dgserve.cluster.engine.errors import Code
    from dgserve.cluster.engine.events import Failed

    busy = StandInUnit(lambda: BackPressureError(num_queued_requests=4, max_queued_requests=4))
    with serve_http(tiny_dir, busy, gateway={"retry_pushback_ms": 2500}) as (base, _):
        status, headers, body = request(f"{base}/chat/completions", {"model": "tiny", "messages": ASK,
                                                                     "stream": True})
        assert status == 429 and headers["retry-after"] == "3" and body["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError, match="overloaded"):
            openai.OpenAI(base_url=base, api_key="none", max_retries=0).chat.completions.create(
                model="tiny", messages=ASK)
    first_block = scripted(tok, "It is sunny")[-1]
    failing = StandInUnit(lambda: [Failed(Code.UNAVAILABLE, "the engine unit failed"), first_block])
    with serve_http(tiny_dir, failing) as (base, _):
        stream = openai.OpenAI(base_url=base, api_key="none", max_retries=0).chat.completions.create(
            model="tiny", messages=ASK, stream=True)
        got = []
        with pytest.raises(openai.APIError, match="the engine unit failed"):
            for ch in stream:
                got.append(ch.choices[0].delta.content)
    assert "It is sunny" in "".join(g or "" for g in got)  # what was committed came before the error


def test_a_draining_server_is_503_and_says_so_on_health(tiny_dir, tok):
    import asyncio

    unit = replies(tok)
    with serve_http(tiny_dir, unit) as (base, service):
        assert request(f"{base[:-3]}/health")[2]["status"] == "serving"
        asyncio.run(service.drain(0))
        status, headers, body = request(f"{base}/chat/completions", {"model": "tiny", "messages": ASK})
        assert status == 503 and "shutting down" in body["error"]["message"] and headers["retry-after"] == "1"
        status, _, body = request(f"{base[:-3]}/health")
        assert status == 503 and body["status"] == "not_serving"
