"""The function-calling loop of the README (`dgserve_client.run_tool_loop`) through the real gateway servicer, its
chat core and the real tiny tokenizer, with the engine unit replaced by scripted model outputs: a reply that
thinks and calls a tool, then (after the tool result) one that answers."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

from dgserve.model.tokenizer import load_tokenizer
from dgserve_client import Client, run_tool_loop

from .test_gateway import StandInUnit

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
SCRIPT = ['<|channel>thought\nI need the weather.<channel|><|tool_call>call:get_weather{city:<|"|>Paris<|"|>}'
          '<tool_call|><|tool_response>',
          "It is sunny in Paris, 21 C.<turn|>"]


def scripted(tok, text: str, C: int = 32) -> list:
    """A reply's events as a unit sends them (popped from the end): blocks of C ids (pad 0 after the end), then
    Finished."""
    from dgserve.cluster.engine.events import BlockCommitted, Finished, Stats

    ids = tok.encode(text, add_special_tokens=False)
    ids += [0] * (-len(ids) % C)
    blocks = [BlockCommitted(b, tuple(ids[b * C:(b + 1) * C]), 2) for b in range(len(ids) // C)]
    done = Finished(tuple(ids), "eos", Stats(len(blocks), (2,) * len(blocks), 8.0, 0.0, 0.0, 0.0))
    return list(reversed([*blocks, done]))


def test_the_tool_loop_runs_a_call_sends_its_result_and_returns_the_answer(tiny_dir):
    from dgserve.cluster.config import parse_topology
    from dgserve.cluster.gateway.convert import Limits, model_info
    from dgserve.cluster.gateway.server import start_server
    from dgserve.cluster.gateway.service import DGServeService
    from dgserve.cluster.gateway.text import TextWorker
    from dgserve.model.config import load_generation_defaults, load_model_config

    tok = load_tokenizer(tiny_dir)
    replies = iter(SCRIPT)
    unit = StandInUnit(lambda: scripted(tok, next(replies)))
    topo = parse_topology({"gateway": {"port": 0}})
    limits, defaults = Limits(512, 32768, 32, 1024, 4096), load_generation_defaults(tiny_dir)
    gw = SimpleNamespace(topo=topo, unit=unit, tokenizer=tok, media=None, limits=limits, defaults=defaults, pad=0,
                         draining=False, inflight=Counter(), caller=None, text=TextWorker(),
                         info=model_info(topo, load_model_config(tiny_dir), defaults, limits, "tiny", "test"))
    calls = []

    def get_weather(city: str) -> dict:
        calls.append(city)
        return {"city": city, "sky": "sunny", "celsius": 21}

    async def main():
        gw.hard_stop = asyncio.Event()
        server, _, port = await start_server(DGServeService(gw), topo.gateway, 1 << 20)
        try:
            def loop():
                messages = [{"role": "user", "content": "Weather in Paris?"}]
                with Client(f"127.0.0.1:{port}") as c:
                    return run_tool_loop(c, messages, TOOLS, {"get_weather": get_weather}, thinking=True), messages
            return await asyncio.to_thread(loop)
        finally:
            await server.stop(None)
            gw.text.close()

    reply, messages = asyncio.run(main())
    assert calls == ["Paris"] and reply.content == "It is sunny in Paris, 21 C." and reply.finish_reason == "stop"
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert messages[2]["tool_call_id"] == messages[1]["tool_calls"][0]["id"] and '"sky": "sunny"' in messages[2][
        "content"]
    first, second = unit.sent  # the second request renders the call and its result into the prompt
    text = tok.decode(list(second.prompt_ids), skip_special_tokens=False)
    assert '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>response:get_weather' in text
    assert "I need the weather." not in text  # the first reply's thinking is not sent back
    assert len(second.prompt_ids) > len(first.prompt_ids)
