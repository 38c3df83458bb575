"""End-to-end benchmark: gRPC clients -> gateway -> engine unit on a local Ray cluster, against the engine in
one process, at 1, 8 and 32 concurrent clients (CPU, bench checkpoint, float32).

Both sides run the same engine thread settings (--threads, see the printed rule) and the same requests (request
i: seed + i), alternating the sides at each N; request i must produce the same token ids on both sides (the
script exits 1 with the first difference otherwise). Per side and N: aggregate tokens/s, time to first block
(p50), time between blocks (p50/p99). The gRPC side uses `GenerateStream` through
`dgserve_client.aio.AsyncClient`; the one-process side iterates the engine's own event streams.
`overhead_ratio` = gRPC tokens/s over one-process tokens/s at 32 clients.

    python benchmarks/serve.py --quick
    python benchmarks/serve.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

QUICK = {"prompt_len": 32, "max_new_tokens": 128, "max_denoising_steps": 4, "repeats": 1}
FULL = {"prompt_len": 128, "max_new_tokens": 192, "max_denoising_steps": 8, "repeats": 1}
CONCURRENCY = (1, 8, 32)
SIDES = ("one-process", "grpc")


async def grpc_level(address: str, prompt: list[int], n: int, args) -> dict:
    from dgserve_client.aio import AsyncClient

    async def one(c, i):
        start, blocks, ids = time.perf_counter(), [], []
        async for m in c.generate_stream(token_ids=prompt, seed=args.seed + i, max_new_tokens=args.max_new_tokens,
                                         max_denoising_steps=args.max_denoising_steps):
            if m.HasField("block"):
                blocks.append(time.perf_counter())
            if m.HasField("final"):
                ids = list(m.final.token_ids)
        return start, blocks, ids

    async with AsyncClient(address) as c:
        await c.info()
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(one(c, i) for i in range(n)))
    return common.summarize_streams(n, runs, time.perf_counter() - t0)


async def engine_level(engine, generation, prompt: list[int], n: int, args) -> dict:
    from dgserve.cluster.engine import EngineRequest
    from dgserve.cluster.engine.events import BlockCommitted, Finished
    from dgserve.model.sampler import SamplerSettings

    s = SamplerSettings.from_defaults(generation, max_new_tokens=args.max_new_tokens,
                                      max_denoising_steps=args.max_denoising_steps)

    async def one(i):
        start, blocks, ids = time.perf_counter(), [], []
        async for e in engine.submit(EngineRequest(prompt, s, seed=args.seed + i)):
            if isinstance(e, BlockCommitted):
                blocks.append(time.perf_counter())
            if isinstance(e, Finished):
                ids = list(e.token_ids)
        return start, blocks, ids

    t0 = time.perf_counter()
    runs = await asyncio.gather(*(one(i) for i in range(n)))
    return common.summarize_streams(n, runs, time.perf_counter() - t0)


def report_lines(config: dict, rows: dict[str, dict[int, dict]], ratio: dict) -> list[str]:
    lines = [f"serve benchmark: bench checkpoint, prompt {config['prompt_len']}, {config['max_new_tokens']} new "
             f"tokens, {config['max_denoising_steps']} steps, cpu float32, repeats {config['repeats']} "
             f"(each row: its median run)"]
    lines += common.stream_table(rows, config["threads_per_side"], "TTFB")
    lines.append(f"overhead_ratio (gRPC end to end / one process, tok/s at {max(CONCURRENCY)}, pairwise per "
                 f"repeat): {common.fmt_spread(ratio, 'x')}")
    return lines


def main(argv=None) -> int:
    args = common.parse_args(__doc__, QUICK, FULL, argv, common.add_unit_flags)
    load = common.LoadWatch()
    folder = common.ensure_checkpoint(args.bench_dir)
    from dgserve.cluster import api
    from dgserve.cluster.engine import Engine, EngineConfig
    from dgserve.model.loader import load_checkpoint

    ck = load_checkpoint(folder, dtype="float32")
    prompt = common.make_prompt(folder, args.prompt_len)
    threads = common.unit_threads(args.threads, args.sampler_threads)
    engine_cfg = common.engine_config(threads, max(CONCURRENCY))
    config = {"preset": common.PRESET, **{k: getattr(args, k) for k in QUICK}, "seed": args.seed,
              "quick": args.quick, "threads": args.threads, "threads_per_side": threads.total, "engine": engine_cfg,
              "torch": torch.__version__, "python": platform.python_version()}
    thread_lines, threads_json = common.threads_report(args.threads, common.UNIT_RULE,
                                                       dict.fromkeys(SIDES, threads))
    note = common.RAY_NOTE.format(extra="the gRPC gateway, ") + "; the gRPC clients run in this process"
    api.start_local(num_cpus=8, temp_dir="/tmp/dgray-bench")
    runs = {side: {n: [] for n in CONCURRENCY} for side in SIDES}
    try:
        ep = api.serve_endpoint(common.unit_topology(folder, engine_cfg, threads,
                                                     gateway={"port": api.free_port()},
                                                     http={"enabled": False}))
        if not ep.wait_serving(300):
            raise SystemExit("the endpoint did not become SERVING")
        warm = argparse.Namespace(**{**vars(args), "max_denoising_steps": 1})
        asyncio.run(grpc_level(ep.address, prompt, 2, warm))
        with Engine(ck.model, EngineConfig(**engine_cfg)) as engine:
            asyncio.run(engine_level(engine, ck.generation, prompt, 2, warm))
            for n in CONCURRENCY:  # alternate the sides at each N
                for _ in range(args.repeats):
                    runs["one-process"][n].append(asyncio.run(engine_level(engine, ck.generation, prompt, n, args)))
                    runs["grpc"][n].append(asyncio.run(grpc_level(ep.address, prompt, n, args)))
    finally:
        api.shutdown()
    return common.report_unit_comparison(runs, SIDES, "overhead_ratio", config, report_lines, thread_lines,
                                         threads_json, note, load.finish(own=threads.total + 1), args.json)


if __name__ == "__main__":
    sys.exit(main())
