"""CPU benchmark: the engine in one process against the same engine as a Ray Serve unit (A = 1).

Same checkpoint as benchmarks/generate.py (`make_tiny(preset="bench")`), float32, 1 torch thread and the same
sampler threads on both sides. For N in 1, 4, 16 concurrent requests (same prompt and settings, seeds 0..N-1)
it measures aggregate tokens/s, iteration latency p50/p99 and the per-iteration control overhead (the part of
an iteration outside the forward and the sampling: planning, applying outcomes, pushing events) against the
compute time. The Ray side goes through a Serve DeploymentHandle, the replica and rank 0's streaming generator:
one Ray call per request, none per step. `orchestration_ratio` = Ray tokens/s over one-process tokens/s at 16.

    python benchmarks/cluster.py --quick      # ~1-2 minutes (Ray start included)
    python benchmarks/cluster.py --json
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

QUICK = {"prompt_len": 32, "max_new_tokens": 64, "max_denoising_steps": 4}
FULL = {"prompt_len": 128, "max_new_tokens": 128, "max_denoising_steps": 8}
CONCURRENCY = (1, 4, 16)


def engine_config(args) -> dict:
    return {"max_running": max(CONCURRENCY), "cpu_threads": 1, "sampler_threads": args.sampler_threads}


def run_inprocess(model, generation, prompt, n: int, args) -> dict:
    from dgserve.cluster.engine import Engine, EngineConfig, EngineRequest
    from dgserve.model.sampler import SamplerSettings

    settings = SamplerSettings.from_defaults(generation, max_new_tokens=args.max_new_tokens,
                                             max_denoising_steps=args.max_denoising_steps)
    with Engine(model, EngineConfig(**engine_config(args))) as engine:
        t0 = time.perf_counter()
        streams = [engine.submit(EngineRequest(prompt, settings, seed=i)) for i in range(n)]
        finals = [s.result(600) for s in streams]
        wall = time.perf_counter() - t0
        steps = engine.metrics.step_summary()
    return summarize(n, finals, wall, steps)


def run_ray(unit, prompt, n: int, args) -> dict:
    from dgserve.cluster.messages import GenerateRequest

    sampler = {"max_new_tokens": args.max_new_tokens, "max_denoising_steps": args.max_denoising_steps}
    unit.handle.reset_step_stats.remote().result()

    async def go():
        return await asyncio.gather(*(unit.generate(GenerateRequest(tuple(prompt), seed=i, sampler=sampler))
                                      for i in range(n)))

    t0 = time.perf_counter()
    finals = asyncio.run(go())
    wall = time.perf_counter() - t0
    steps = unit.status()["ranks"][0]["steps"]
    return summarize(n, finals, wall, steps)


def summarize(n, finals, wall, steps) -> dict:
    tokens = sum(len(f.token_ids) for f in finals)
    compute = steps["step_s_mean"] - steps["control_s_mean"]
    return {"concurrency": n, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "step_ms_p50": 1000 * steps["step_s_p50"], "step_ms_p99": 1000 * steps["step_s_p99"],
            "control_ms_per_step": 1000 * steps["control_s_mean"], "compute_ms_per_step": 1000 * compute,
            "control_share": steps["control_s_mean"] / steps["step_s_mean"],
            "token_ids": [list(f.token_ids) for f in finals]}


def print_table(config, rows: dict[str, list[dict]], ratio: float, same: bool) -> None:
    print(f"cluster benchmark: {config['preset']} checkpoint, prompt {config['prompt_len']}, "
          f"{config['max_new_tokens']} new tokens, {config['max_denoising_steps']} steps, cpu float32")
    print(f"{'side':<11}{'N':>4}{'tok/s':>9}{'wall s':>8}{'step p50 ms':>12}{'p99 ms':>9}{'control ms':>11}"
          f"{'compute ms':>11}{'control %':>10}")
    for side, levels in rows.items():
        for lv in levels:
            print(f"{side:<11}{lv['concurrency']:>4}{lv['tokens_per_s']:>9.1f}{lv['wall_s']:>8.2f}"
                  f"{lv['step_ms_p50']:>12.1f}{lv['step_ms_p99']:>9.1f}{lv['control_ms_per_step']:>11.2f}"
                  f"{lv['compute_ms_per_step']:>11.1f}{lv['control_share']:>10.1%}")
    print(f"orchestration_ratio (Ray unit / one process, tok/s at {max(CONCURRENCY)}): {ratio:.2f}   "
          f"same tokens on both sides: {same}")


def parse_args(argv):
    return parse_workload(__doc__, QUICK, FULL, argv,
                          lambda p: p.add_argument("--sampler-threads", type=int, default=2))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    folder = ensure_checkpoint(args.bench_dir)
    from dgserve.cluster import api
    from dgserve.model.loader import load_checkpoint

    ck = load_checkpoint(folder, dtype="float32")
    prompt = make_prompt(folder, args.prompt_len)
    config = {"preset": "bench", "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens,
              "max_denoising_steps": args.max_denoising_steps, "sampler_threads": args.sampler_threads,
              "quick": args.quick, "torch": torch.__version__, "python": platform.python_version(),
              "cpu_count": os.cpu_count()}
    api.start_local(num_cpus=8, temp_dir="/tmp/dgray-bench")
    try:
        unit = api.deploy({"name": "bench", "model": str(folder), "engine": engine_config(args),
                           "resources": {"attention": {"cpus": args.sampler_threads}}})
        run_ray(unit, prompt, 2, argparse.Namespace(**{**vars(args), "max_denoising_steps": 2}))  # warm-up
        run_inprocess(ck.model, ck.generation, prompt, 2, argparse.Namespace(**{**vars(args),
                                                                                "max_denoising_steps": 2}))
        rows = {"one-process": [], "ray-unit": []}
        for n in CONCURRENCY:  # alternate the sides at each N
            rows["one-process"].append(run_inprocess(ck.model, ck.generation, prompt, n, args))
            rows["ray-unit"].append(run_ray(unit, prompt, n, args))
    finally:
        api.shutdown()
    same = all(a["token_ids"] == b["token_ids"] for a, b in zip(rows["one-process"], rows["ray-unit"], strict=True))
    ratio = rows["ray-unit"][-1]["tokens_per_s"] / rows["one-process"][-1]["tokens_per_s"]
    print_table(config, rows, ratio, same)
    if args.json:
        for levels in rows.values():
            for lv in levels:
                lv.pop("token_ids")
        print(json.dumps({"config": config, "levels": rows, "orchestration_ratio": ratio, "same_tokens": same}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
