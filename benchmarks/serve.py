"""End-to-end benchmark: gRPC clients -> gateway -> engine unit on a local Ray cluster, against the engine in
one process, at 1, 8 and 32 concurrent clients (CPU, bench checkpoint, float32).

Per side and N: aggregate tokens/s, time to first block (p50), time between blocks (p50/p99). The gRPC side
uses `GenerateStream` through `dgserve_client.aio.AsyncClient`; the one-process side iterates the engine's own
event streams. `overhead_ratio` = gRPC tokens/s over one-process tokens/s at 32 clients.

    python benchmarks/serve.py --quick
    python benchmarks/serve.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import parse_workload  # noqa: E402
from benchmarks.generate import ensure_checkpoint, make_prompt  # noqa: E402

QUICK = {"prompt_len": 32, "max_new_tokens": 128, "max_denoising_steps": 4}
FULL = {"prompt_len": 128, "max_new_tokens": 192, "max_denoising_steps": 8}
CONCURRENCY = (1, 8, 32)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summarize(n: int, runs: list[tuple[float, list[float], int]], wall: float) -> dict:
    """runs: (start, block arrival times, tokens) per request."""
    ttfb = [blocks[0] - start for start, blocks, _ in runs if blocks]
    gaps = [b - a for _, blocks, _ in runs for a, b in zip(blocks, blocks[1:], strict=False)]
    tokens = sum(t for _, _, t in runs)
    return {"concurrency": n, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttfb_ms_p50": 1000 * pct(ttfb, 0.5), "between_blocks_ms_p50": 1000 * pct(gaps, 0.5),
            "between_blocks_ms_p99": 1000 * pct(gaps, 0.99)}


async def grpc_level(address: str, prompt: list[int], n: int, args) -> dict:
    from dgserve_client.aio import AsyncClient

    async def one(c, i):
        start, blocks, tokens = time.perf_counter(), [], 0
        async for m in c.generate_stream(token_ids=prompt, seed=i, max_new_tokens=args.max_new_tokens,
                                         max_denoising_steps=args.max_denoising_steps):
            if m.HasField("block"):
                blocks.append(time.perf_counter())
            if m.HasField("final"):
                tokens = len(m.final.token_ids)
        return start, blocks, tokens

    async with AsyncClient(address) as c:
        await c.info()
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(one(c, i) for i in range(n)))
    return summarize(n, runs, time.perf_counter() - t0)


async def engine_level(engine, generation, prompt: list[int], n: int, args) -> dict:
    from dgserve.cluster.engine import EngineRequest
    from dgserve.cluster.engine.events import BlockCommitted, Finished
    from dgserve.model.sampler import SamplerSettings

    s = SamplerSettings.from_defaults(generation, max_new_tokens=args.max_new_tokens,
                                      max_denoising_steps=args.max_denoising_steps)

    async def one(i):
        start, blocks, tokens = time.perf_counter(), [], 0
        async for e in engine.submit(EngineRequest(prompt, s, seed=i)):
            if isinstance(e, BlockCommitted):
                blocks.append(time.perf_counter())
            if isinstance(e, Finished):
                tokens = len(e.token_ids)
        return start, blocks, tokens

    t0 = time.perf_counter()
    runs = await asyncio.gather(*(one(i) for i in range(n)))
    return summarize(n, runs, time.perf_counter() - t0)


def parse_args(argv):
    return parse_workload(__doc__, QUICK, FULL, argv,
                          lambda p: p.add_argument("--sampler-threads", type=int, default=2))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    folder = ensure_checkpoint(args.bench_dir)
    from dgserve.cluster import api
    from dgserve.cluster.engine import Engine, EngineConfig
    from dgserve.cluster.serve import wait_serving
    from dgserve.model.loader import load_checkpoint

    ck = load_checkpoint(folder, dtype="float32")
    prompt = make_prompt(folder, args.prompt_len)
    engine_cfg = {"max_running": max(CONCURRENCY), "cpu_threads": 1, "sampler_threads": args.sampler_threads}
    config = {"preset": "bench", **{k: getattr(args, k) for k in QUICK}, "quick": args.quick,
              "sampler_threads": args.sampler_threads, "torch": torch.__version__,
              "python": platform.python_version(), "cpu_count": os.cpu_count()}
    api.start_local(num_cpus=8, temp_dir="/tmp/dgray-bench")
    rows: dict[str, list[dict]] = {"one-process": [], "grpc": []}
    try:
        ep = api.serve_endpoint({"name": "bench", "model": str(folder), "engine": engine_cfg,
                                 "resources": {"attention": {"cpus": args.sampler_threads}},
                                 "gateway": {"port": api.free_port()}})
        if not wait_serving(ep.address, 300):
            raise SystemExit("the endpoint did not become SERVING")
        warm = argparse.Namespace(**{**vars(args), "max_denoising_steps": 1})
        asyncio.run(grpc_level(ep.address, prompt, 2, warm))
        with Engine(ck.model, EngineConfig(**engine_cfg)) as engine:
            asyncio.run(engine_level(engine, ck.generation, prompt, 2, warm))
            for n in CONCURRENCY:  # alternate the sides at each N
                rows["one-process"].append(asyncio.run(engine_level(engine, ck.generation, prompt, n, args)))
                rows["grpc"].append(asyncio.run(grpc_level(ep.address, prompt, n, args)))
    finally:
        api.shutdown()
    ratio = rows["grpc"][-1]["tokens_per_s"] / rows["one-process"][-1]["tokens_per_s"]
    print(f"serve benchmark: bench checkpoint, prompt {args.prompt_len}, {args.max_new_tokens} new tokens, "
          f"{args.max_denoising_steps} steps, cpu float32")
    print(f"{'side':<12}{'N':>4}{'tok/s':>9}{'wall s':>8}{'TTFB p50 ms':>12}{'between p50':>12}{'p99 ms':>9}")
    for side, levels in rows.items():
        for lv in levels:
            print(f"{side:<12}{lv['concurrency']:>4}{lv['tokens_per_s']:>9.1f}{lv['wall_s']:>8.2f}"
                  f"{lv['ttfb_ms_p50']:>12.1f}{lv['between_blocks_ms_p50']:>12.1f}{lv['between_blocks_ms_p99']:>9.1f}")
    print(f"overhead_ratio (gRPC end to end / one process, tok/s at {max(CONCURRENCY)}): {ratio:.2f}")
    if args.json:
        print(json.dumps({"config": config, "levels": rows, "overhead_ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
