"""The OpenAI-compatible API through Ray Serve's HTTP proxy, in front of the package's real endpoint (the tiny model
on engine units; tests/cluster/gateway/conftest.py): a seed gives the gRPC API's tokens, streamed or not; a bad
body is refused by name and the endpoint keeps serving."""

from __future__ import annotations

import openai

from dgserve_client import Client

from .test_chat_grpc import HISTORY, TOOLS
from .test_http import request

KNOBS = {"max_denoising_steps": 6, "return_token_ids": True}


def test_a_seed_gives_the_grpc_apis_tokens_streamed_or_not(endpoint, http_base):
    address, _, _ = endpoint
    c = openai.OpenAI(base_url=http_base, api_key="none", max_retries=0)
    r = c.chat.completions.create(model="tiny", messages=HISTORY, tools=TOOLS, seed=3, max_tokens=64,
                                  extra_body=KNOBS)
    chunks = list(c.chat.completions.create(model="tiny", messages=HISTORY, tools=TOOLS, seed=3, max_tokens=64,
                                            stream=True, extra_body=KNOBS))
    done = c.completions.create(model="tiny", prompt=[5, 6, 7], seed=4, max_tokens=64, extra_body=KNOBS)
    with Client(address) as g:
        chat = g.chat(HISTORY, TOOLS, seed=3, max_new_tokens=64, max_denoising_steps=6)
        gen = g.generate(token_ids=[5, 6, 7], seed=4, max_new_tokens=64, max_denoising_steps=6)
    choice = r.choices[0]
    assert choice.model_extra["token_ids"] == list(chat.token_ids)
    assert (choice.message.content or "") == chat.content and choice.finish_reason == chat.finish_reason
    assert r.usage.prompt_tokens == chat.usage.prompt_tokens
    assert chunks[-1].model_extra["token_ids"] == list(chat.token_ids)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == chat.content
    assert done.choices[0].model_extra["token_ids"] == list(gen.token_ids)



def test_a_prompt_sent_again_comes_from_the_prefix_cache_with_the_same_tokens(endpoint, http_base):
    """The endpoint's one attention rank: the second of two equal prompts of one tenant (one key over HTTP; no key
    over gRPC) encodes nothing, and gives the same tokens."""
    address, _, _ = endpoint
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    c = openai.OpenAI(base_url=http_base, api_key="tenant-a", max_retries=0)
    first, again = (c.completions.create(model="tiny", prompt=prompt, seed=4, max_tokens=64, extra_body=KNOBS)
                    for _ in range(2))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == len(prompt)
    assert again.choices[0].model_extra["token_ids"] == first.choices[0].model_extra["token_ids"]
    with Client(address) as g:  # another tenant: nothing cached for it yet
        one, two = (g.generate(token_ids=prompt, seed=4, max_new_tokens=64, max_denoising_steps=6) for _ in range(2))
    assert (one.usage.cached_prompt_tokens, two.usage.cached_prompt_tokens) == (0, len(prompt))
    assert list(one.token_ids) == list(two.token_ids) == first.choices[0].model_extra["token_ids"]


def test_a_bad_body_through_the_proxy_is_400_naming_the_field_and_the_endpoint_keeps_serving(endpoint, http_base):
    status, headers, body = request(f"{http_base}/chat/completions",
                                    {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
                                    {"x-request-id": "proxy-1"})
    assert status == 400 and body["error"]["param"] == "messages[0].role" and headers["x-request-id"] == "proxy-1"
    status, _, body = request(f"{http_base[:-3]}/health")
    assert status == 200 and body["status"] == "serving"
    assert [m.id for m in openai.OpenAI(base_url=http_base, api_key="none").models.list()] == ["tiny"]
