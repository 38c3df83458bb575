"""Chat and ChatStream over real gRPC against the package's local cluster (tests/cluster/gateway/conftest.py): the
reply split by the chat core, the same tokens as Generate on the rendered prompt, and bad chats refused by name
while the server keeps serving."""

from __future__ import annotations

import asyncio
import re

import pytest

from dgserve.cluster.gateway.chat import parse_conversation, render_ids
from dgserve.model.tokenizer import load_tokenizer
from dgserve_client import Client, InvalidArgument
from dgserve_client.aio import AsyncClient

SHORT = {"max_new_tokens": 64, "max_denoising_steps": 6}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
HISTORY = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": "", "tool_calls": [
               {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
           {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"}]


def test_chat_gives_generates_tokens_for_the_rendered_conversation(endpoint, tiny_dir):
    address, _, _ = endpoint
    ids = render_ids(load_tokenizer(tiny_dir), parse_conversation(HISTORY, TOOLS))
    with Client(address) as c:
        reply = c.chat(HISTORY, TOOLS, seed=3, **SHORT)
        same = c.generate(token_ids=ids, seed=3, **SHORT)
        msgs = list(c.chat_stream(HISTORY, TOOLS, seed=3, **SHORT))
    assert list(reply.token_ids) == list(same.token_ids) and reply.usage.prompt_tokens == len(ids)
    assert reply.finish_reason in ("stop", "length", "tool_calls") and reply.request_id
    final = msgs[-1].final
    deltas = [m.delta for m in msgs[:-1]]
    assert list(final.token_ids) == list(reply.token_ids)
    assert "".join(d.content for d in deltas) == final.content == reply.content
    assert "".join(d.reasoning for d in deltas) == final.reasoning
    assert [t.name for d in deltas for t in d.tool_calls] == [t.name for t in final.tool_calls]
    assert len(deltas) >= final.stats.blocks  # a delta per committed block (and one for what the end releases)


def test_asyncio_chat_streams_too(endpoint):
    address, _, _ = endpoint

    async def main():
        async with AsyncClient(address) as c:
            return [m async for m in c.chat_stream([{"role": "user", "content": "Hi"}], seed=1, thinking=True,
                                                   **SHORT)]

    msgs = asyncio.run(main())
    assert msgs[-1].HasField("final") and all(m.HasField("delta") for m in msgs[:-1])


@pytest.mark.parametrize(("messages", "tools", "field"), [
    ([{"role": "robot", "content": "x"}], None, "messages[0].role"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c9", "content": "r"}], None, "messages[1]"),
    (HISTORY[:3] + [{"role": "tool", "tool_call_id": "nope", "content": "r"}], TOOLS, "messages[3].tool_call_id"),
    ([{"role": "user", "content": "x"}], [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 5}}}}}],
     "tools[0].function.parameters"),
    ([{"role": "user", "content": "x"}], [{"type": "function", "function": {"name": "f", "parameters": "{oops"}}],
     "tools[0].parameters_json"),
    ([{"role": "user", "content": "a " * 1000}], None, "messages: the conversation is"),  # over 512 tokens
    ([{"role": "user", "content": "x" * 5000}], None, "messages: 5000 characters"),  # over 4096 text bytes
])
def test_bad_chats_are_invalid_argument_naming_the_field_and_the_server_keeps_serving(endpoint, messages, tools,
                                                                                       field):
    address, _, _ = endpoint
    with Client(address) as c:
        with pytest.raises(InvalidArgument, match=re.escape(field if ":" in field else f"{field}: ")):
            c.chat(messages, tools, **SHORT)
        assert c.health() == "SERVING"


def test_the_client_cli_chats_with_system_tools_thinking_and_streaming(endpoint, tmp_path, capsys):
    import json
    import subprocess
    import sys

    address, _, _ = endpoint
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    base = [sys.executable, "-m", "dgserve_client.cli", "--target", address, "chat", "Weather in Paris?",
            "--system", "Be brief.", "--tools", str(tools), "--thinking", "--seed", "3", "--max-new-tokens", "64",
            "--max-denoising-steps", "6"]
    streamed = subprocess.run([*base, "--stream", "--json"], capture_output=True, text=True, timeout=120)
    assert streamed.returncode == 0, streamed.stderr
    with Client(address) as c:
        want = c.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}],
                      TOOLS, seed=3, thinking=True, **SHORT)
    out = json.loads(streamed.stdout.strip().splitlines()[-1])
    assert out["token_ids"] == list(want.token_ids) and out["content"] == want.content
    from dgserve_client.cli import main  # the unary path and a bad --tools file, in this process

    assert main([*base[3:], "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"] == list(want.token_ids)
    tools.write_text("{not json")
    assert main([*base[3:], "--json"]) == 2
    assert "--tools: cannot read a JSON list of tool declarations" in capsys.readouterr().err
