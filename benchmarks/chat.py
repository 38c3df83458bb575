"""The chat APIs end to end: the OpenAI-compatible HTTP API (Ray Serve's HTTP proxy -> the HTTP ingress) against
gRPC `ChatStream` (the gateway), at 1 and 8 concurrent streams, on one endpoint (CPU, bench checkpoint, float32),
and the time the chat core takes to render and parse a 6-turn conversation with tools.

Both sides send the same conversation (a system prompt, tools, a tool round and a new question) to the same
engine unit, request i with seed + i, streaming, alternating the sides at each N; request i must give the same
token ids on both sides (the script exits 1 with the first difference otherwise). Per side and N: aggregate
tokens/s, time to the first delta with text or a call (p50), time between such deltas (p50/p99). The HTTP side
is the official `openai` client (AsyncOpenAI, `stream=True`, the knobs in `extra_body`); the gRPC side
`dgserve_client.aio.AsyncClient`.
`http_overhead_ratio` = HTTP tokens/s over gRPC tokens/s at 8 streams.

    python benchmarks/chat.py --quick
    python benchmarks/chat.py --json
"""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

# the prompt is the fixed conversation below: --prompt-len does not apply
QUICK = {"prompt_len": None, "max_new_tokens": 128, "max_denoising_steps": 2, "repeats": 1}
FULL = {"prompt_len": None, "max_new_tokens": 192, "max_denoising_steps": 8, "repeats": 3}
CONCURRENCY = (1, 8)
SIDES = ("grpc", "http")
TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name.replace('_', ' ')} of a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "unit": {"type": "string",
                                                                                    "enum": ["C", "F"]}},
                                               "required": ["city"]}}}
         for name in ("get_weather", "get_time", "get_population")]
CONVERSATION = [
    {"role": "system", "content": "You are a concise travel assistant. Use the tools when they help."},
    {"role": "user", "content": "I am flying to Paris tomorrow. What should I pack?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "C"})}}]},
    {"role": "tool", "tool_call_id": "c1", "content": json.dumps({"sky": "rain", "celsius": 14})},
    {"role": "assistant", "content": "Rain and 14 C: pack a light raincoat and layers."},
    {"role": "user", "content": "And what time is it there now, and how many people live there?"},
]
REPLY = ('<|channel>thought\nTwo lookups: time and population.<channel|><|tool_call>call:get_time{city:<|"|>Paris'
         '<|"|>}<tool_call|><|tool_call>call:get_population{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>')


async def grpc_side(address: str, n: int, args) -> dict:
    from dgserve_client.aio import AsyncClient

    async def one(c, i):
        start, times, ids = time.perf_counter(), [], []
        async for m in c.chat_stream(CONVERSATION, TOOLS, seed=args.seed + i, max_new_tokens=args.max_new_tokens,
                                     max_denoising_steps=args.max_denoising_steps):
            if m.HasField("delta"):
                if m.delta.content or m.delta.reasoning or m.delta.tool_calls:
                    times.append(time.perf_counter())
            else:
                ids = list(m.final.token_ids)
        return start, times, ids

    async with AsyncClient(address) as c:
        await c.info()
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(one(c, i) for i in range(n)))
    return common.summarize_streams(n, runs, time.perf_counter() - t0)


async def http_side(base: str, model: str, n: int, args) -> dict:
    import openai

    async def one(c, i):
        start, times, ids = time.perf_counter(), [], []
        stream = await c.chat.completions.create(
            model=model, messages=CONVERSATION, tools=TOOLS, seed=args.seed + i, max_tokens=args.max_new_tokens,
            stream=True, extra_body={"max_denoising_steps": args.max_denoising_steps, "return_token_ids": True})
        async for chunk in stream:
            delta = chunk.choices[0].delta if chunk.choices else None
            if delta is not None and (delta.content or getattr(delta, "reasoning_content", None) or delta.tool_calls):
                times.append(time.perf_counter())
            if chunk.choices and chunk.choices[0].finish_reason is not None:
                ids = chunk.model_extra["token_ids"]
        return start, times, ids

    async with openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=600) as c:
        await c.models.list()
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(one(c, i) for i in range(n)))
    return common.summarize_streams(n, runs, time.perf_counter() - t0)


def chat_core_times(folder: Path, repeats: int) -> dict:
    """Rendering the 6-turn conversation with its 3 tools (check, template, tokenize) and parsing a reply with
    thinking and two tool calls fed in 64-character pieces: median ms over `repeats` runs."""
    from dgserve.cluster.gateway.chat import ReplyParser, parse_conversation, render_ids
    from dgserve.model.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    render, parse, ids, calls = [], [], [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        ids = render_ids(tok, parse_conversation(CONVERSATION, TOOLS))
        t1 = time.perf_counter()
        p = ReplyParser("bench")
        for k in range(0, len(REPLY), 64):
            p.feed(REPLY[k:k + 64])
        p.finish()
        t2 = time.perf_counter()
        render.append(1000 * (t1 - t0))
        parse.append(1000 * (t2 - t1))
        calls = len(p.reply.tool_calls)
    if calls != 2:
        raise SystemExit(f"the reply parser found {calls} tool calls, expected 2")
    return {"turns": len(CONVERSATION), "tools": len(TOOLS), "prompt_tokens": len(ids), "repeats": repeats,
            "render_ms_p50": statistics.median(render), "parse_ms_p50": statistics.median(parse),
            "tool_calls_parsed": calls}


def report_lines(config: dict, rows: dict[str, dict[int, dict]], ratio: dict) -> list[str]:
    core = config["chat_core"]
    lines = [f"chat benchmark: bench checkpoint, a {core['turns']}-turn conversation with {core['tools']} tools "
             f"({core['prompt_tokens']} prompt tokens), {config['max_new_tokens']} new tokens, "
             f"{config['max_denoising_steps']} steps, cpu float32, streaming, repeats {config['repeats']} "
             f"(each row: its median run)"]
    lines += common.stream_table(rows, config["threads_per_side"], "first delta")
    lines.append(f"http_overhead_ratio (HTTP / gRPC tok/s at {max(CONCURRENCY)} streams, pairwise per repeat): "
                 f"{common.fmt_spread(ratio, 'x')}")
    lines.append(f"chat core: render {core['render_ms_p50']:.2f} ms (check + template + tokenize), parse "
                 f"{core['parse_ms_p50']:.3f} ms ({core['tool_calls_parsed']} tool calls and thinking, in 64-char "
                 f"pieces), median of {core['repeats']}")
    return lines


def main(argv=None) -> int:
    args = common.parse_args(__doc__, QUICK, FULL, argv, common.add_unit_flags)
    load = common.LoadWatch()
    folder = common.ensure_checkpoint(args.bench_dir)
    from dgserve.cluster import api

    threads = common.unit_threads(args.threads, args.sampler_threads)
    engine_cfg = common.engine_config(threads, max(CONCURRENCY))
    config = {"preset": common.PRESET, **{k: getattr(args, k) for k in QUICK if k != "prompt_len"},
              "seed": args.seed, "quick": args.quick, "threads": args.threads, "threads_per_side": threads.total,
              "engine": engine_cfg, "torch": torch.__version__, "python": platform.python_version(),
              "chat_core": chat_core_times(folder, 20 if args.quick else 100)}
    thread_lines, threads_json = common.threads_report(args.threads, common.UNIT_RULE, dict.fromkeys(SIDES, threads))
    note = (common.RAY_NOTE.format(extra="the gRPC gateway, the HTTP proxy and ingress, ") +
            "; both sides' clients run in this process, against the same engine unit")
    http_port = api.free_port()
    api.start_local(num_cpus=8, temp_dir="/tmp/dgray-bench", http={"host": "127.0.0.1", "port": http_port})
    runs = {side: {n: [] for n in CONCURRENCY} for side in SIDES}
    try:
        ep = api.serve_endpoint(common.unit_topology(folder, engine_cfg, threads, gateway={"port": api.free_port()},
                                                     http={"port": http_port}))
        if not ep.wait_serving(300):
            raise SystemExit("the endpoint did not become SERVING")
        base, model = ep.http_url + "/v1", ep.topology.served_model_name
        warm = type(args)(**{**vars(args), "max_denoising_steps": 1})
        asyncio.run(grpc_side(ep.address, 2, warm))
        asyncio.run(http_side(base, model, 2, warm))
        for n in CONCURRENCY:  # alternate the sides at each N
            for _ in range(args.repeats):
                runs["grpc"][n].append(asyncio.run(grpc_side(ep.address, n, args)))
                runs["http"][n].append(asyncio.run(http_side(base, model, n, args)))
    finally:
        api.shutdown()
    return common.report_unit_comparison(runs, SIDES, "http_overhead_ratio", config, report_lines, thread_lines,
                                         threads_json, note, load.finish(own=threads.total + 1), args.json)


if __name__ == "__main__":
    sys.exit(main())
