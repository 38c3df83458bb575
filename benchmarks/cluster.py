"""CPU benchmark: the engine in one process against the same engine as a Ray Serve unit (A = 1).

Same checkpoint as benchmarks/generate.py (`make_tiny(preset="bench")`), float32, the same engine thread settings
on both sides (--threads, see the printed rule). For N in 1, 4, 16 concurrent requests (same prompt and settings,
seeds seed..seed+N-1), alternating the sides, it measures aggregate tokens/s, iteration latency p50/p99 and the
per-iteration control overhead (the part of an iteration outside the forward and the sampling: planning,
applying outcomes, pushing events) against the compute time. The Ray side goes through a Serve DeploymentHandle,
the replica and rank 0's streaming generator: one Ray call per request, none per step. Both sides must produce
the same tokens per request (the script exits 1 otherwise). `orchestration_ratio` = Ray tokens/s over
one-process tokens/s at 16.

    python benchmarks/cluster.py --quick      # ~1-2 minutes (Ray start included)
    python benchmarks/cluster.py --json
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

QUICK = {"prompt_len": 32, "max_new_tokens": 64, "max_denoising_steps": 4, "repeats": 1}
FULL = {"prompt_len": 128, "max_new_tokens": 128, "max_denoising_steps": 8, "repeats": 1}
CONCURRENCY = (1, 4, 16)
SIDES = ("one-process", "ray-unit")


def run_inprocess(model, generation, prompt, n: int, args, engine_cfg: dict) -> dict:
    from dgserve.cluster.engine import Engine, EngineConfig, EngineRequest
    from dgserve.model.sampler import SamplerSettings

    settings = SamplerSettings.from_defaults(generation, max_new_tokens=args.max_new_tokens,
                                             max_denoising_steps=args.max_denoising_steps)
    with Engine(model, EngineConfig(**engine_cfg)) as engine:
        t0 = time.perf_counter()
        streams = [engine.submit(EngineRequest(prompt, settings, seed=args.seed + i)) for i in range(n)]
        finals = [s.result(600) for s in streams]
        wall = time.perf_counter() - t0
        steps = engine.metrics.step_summary()
    return summarize(n, finals, wall, steps)


def run_ray(unit, prompt, n: int, args) -> dict:
    from dgserve.cluster.messages import GenerateRequest

    sampler = {"max_new_tokens": args.max_new_tokens, "max_denoising_steps": args.max_denoising_steps}
    unit.handle.reset_step_stats.remote().result()

    async def go():
        return await asyncio.gather(*(unit.generate(GenerateRequest(tuple(prompt), seed=args.seed + i,
                                                                    sampler=sampler)) for i in range(n)))

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


def report_lines(config, rows: dict[str, dict[int, dict]], ratio: dict) -> list[str]:
    lines = [f"cluster benchmark: {config['preset']} checkpoint, prompt {config['prompt_len']}, "
             f"{config['max_new_tokens']} new tokens, {config['max_denoising_steps']} steps, cpu float32, "
             f"repeats {config['repeats']} (each row: its median run)"]
    table = [("side", "N", "threads", "tok/s", "min", "max", "wall s", "step p50 ms", "p99 ms", "control ms",
              "compute ms", "control %")]
    for side, levels in rows.items():
        for n, lv in levels.items():
            tps = lv["tokens_per_s_spread"]
            table.append((side, str(n), str(config["threads_per_side"]), f"{lv['tokens_per_s']:.1f}",
                          f"{tps['min']:.1f}", f"{tps['max']:.1f}", f"{lv['wall_s']:.2f}", f"{lv['step_ms_p50']:.1f}",
                          f"{lv['step_ms_p99']:.1f}", f"{lv['control_ms_per_step']:.2f}",
                          f"{lv['compute_ms_per_step']:.1f}", f"{lv['control_share']:.1%}"))
    lines += common.table(table)
    lines.append(f"orchestration_ratio (Ray unit / one process, tok/s at {max(CONCURRENCY)}, pairwise per repeat): "
                 f"{common.fmt_spread(ratio, 'x')}")
    return lines


def main(argv=None) -> int:
    args = common.parse_args(__doc__, QUICK, FULL, argv, common.add_unit_flags)
    load = common.LoadWatch()
    folder = common.ensure_checkpoint(args.bench_dir)
    from dgserve.cluster import api
    from dgserve.model.loader import load_checkpoint

    ck = load_checkpoint(folder, dtype="float32")
    prompt = common.make_prompt(folder, args.prompt_len)
    threads = common.unit_threads(args.threads, args.sampler_threads)
    engine_cfg = common.engine_config(threads, max(CONCURRENCY))
    config = {"preset": common.PRESET, "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens,
              "max_denoising_steps": args.max_denoising_steps, "repeats": args.repeats, "seed": args.seed,
              "quick": args.quick, "threads": args.threads, "threads_per_side": threads.total, "engine": engine_cfg,
              "torch": torch.__version__, "python": platform.python_version()}
    thread_lines, threads_json = common.threads_report(args.threads, common.UNIT_RULE,
                                                       dict.fromkeys(SIDES, threads))
    note = common.RAY_NOTE.format(extra="")
    api.start_local(num_cpus=8, temp_dir="/tmp/dgray-bench")
    try:
        unit = api.deploy(common.unit_topology(folder, engine_cfg, threads))
        warm = argparse.Namespace(**{**vars(args), "max_denoising_steps": 2})
        run_ray(unit, prompt, 2, warm)
        run_inprocess(ck.model, ck.generation, prompt, 2, warm, engine_cfg)
        runs = {side: {n: [] for n in CONCURRENCY} for side in SIDES}
        for n in CONCURRENCY:  # alternate the sides at each N
            for _ in range(args.repeats):
                runs["one-process"][n].append(run_inprocess(ck.model, ck.generation, prompt, n, args, engine_cfg))
                runs["ray-unit"][n].append(run_ray(unit, prompt, n, args))
    finally:
        api.shutdown()
    return common.report_unit_comparison(runs, SIDES, "orchestration_ratio", config, report_lines, thread_lines,
                                         threads_json, note, load.finish(own=threads.total + 1), args.json)


if __name__ == "__main__":
    sys.exit(main())
