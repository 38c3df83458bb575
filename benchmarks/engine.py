"""CPU benchmark: the engine's aggregate throughput at 1, 4 and 16 concurrent requests (continuous batching).

One process, the checkpoint of benchmarks/generate.py (`make_tiny(preset="bench")`: hidden 512, 8 layers,
32 experts top-4, vocab 32000, canvas 64), float32. For each concurrency N a fresh engine gets N requests at
once (the same prompt length and settings, seeds seed..seed+N-1) and runs them to the end; aggregate tokens per
second is all generated tokens over the wall time. Every N runs with the same threads (the budget --threads:
torch threads, noise drawn inline, no sampler pool), so `batching_gain` (16 over 1) is batching alone. The sampler pool
(--sampler-threads K: K-1 more threads for per-canvas work, which only several canvases can use) is its own
row at N = 16 and its own figure, `sampler_pool_gain`. Request i must give the same tokens in every row
(checked: batching is bitwise invisible on CPU float32), so every row does the same work per request.

    python benchmarks/engine.py --quick          # 1 block, 8 steps (about a minute)
    python benchmarks/engine.py                  # 2 blocks, 16 steps
    python benchmarks/engine.py --json           # + one JSON object on the last line (`batching_gain`)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import Threads  # noqa: E402

QUICK = {"prompt_len": 32, "max_new_tokens": 64, "max_denoising_steps": 8, "repeats": 1}
FULL = {"prompt_len": 128, "max_new_tokens": 128, "max_denoising_steps": 16, "repeats": 1}
CONCURRENCY = (1, 4, 16)
POOL_ROW = "16+pool"


def run_level(model, generation, prompt: list[int], n: int, args, threads: Threads) -> dict:
    from dgserve.cluster.engine import Engine, EngineConfig, EngineRequest
    from dgserve.cluster.engine.metrics import percentile
    from dgserve.model.sampler import SamplerSettings

    settings = SamplerSettings.from_defaults(generation, max_new_tokens=args.max_new_tokens,
                                             max_denoising_steps=args.max_denoising_steps)
    config = EngineConfig(max_running=max(CONCURRENCY), cpu_threads=threads.torch,
                          sampler_threads=threads.sampler_threads, noise_prefetch=threads.prefetch)
    engine = Engine(model, config)  # sets torch's threads to cpu_threads
    t0 = time.perf_counter()
    streams = [engine.submit(EngineRequest(prompt, settings, seed=args.seed + i)) for i in range(n)]
    peak_budget = peak_kv = 0
    latencies = []
    while not engine.idle:
        s0 = time.perf_counter()
        engine.step()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        latencies.append(time.perf_counter() - s0)
        peak_budget = max(peak_budget, engine.budget.used)
        peak_kv = max(peak_kv, engine.metrics.kv_bytes)
    wall = time.perf_counter() - t0
    engine.stop()
    results = [s.result(0) for s in streams]
    tokens = sum(len(r.token_ids) for r in results)
    m = engine.metrics
    split_total = sum(m.time_s.values()) or 1.0
    return {
        "concurrency": n, "threads": threads.total, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
        "iterations": m.iterations, "canvases_per_step": m.canvas_steps / max(1, m.iterations),
        "step_ms_p50": 1000 * percentile(latencies, 0.5), "step_ms_p99": 1000 * percentile(latencies, 0.99),
        "bytes_reserved_per_request": peak_budget / n, "kv_bytes_per_request": peak_kv / n,
        "time_split": {k: v / split_total for k, v in m.time_s.items()},
        "steps_per_block": [list(r.stats.steps_per_block) for r in results],
        "token_ids": [list(r.token_ids) for r in results],
    }


def equal_work(runs: dict[str, list[dict]], exact: bool) -> dict:
    """Request i of every run of every row against request i of the first run at N = 16."""
    expected = runs[str(max(CONCURRENCY))][0]["token_ids"]
    return common.check_tokens([(f"row {row} run {k} request {i}", expected[i], ids)
                                for row, rs in runs.items() for k, run in enumerate(rs)
                                for i, ids in enumerate(run["token_ids"])], exact)


def report_lines(config: dict, levels: dict[str, dict], gains: dict) -> list[str]:
    lines = [f"engine benchmark: {config['preset']} checkpoint, prompt {config['prompt_len']}, "
             f"{config['max_new_tokens']} new tokens, {config['max_denoising_steps']} steps, "
             f"{config['device']} {config['dtype']}, repeats {config['repeats']} (each row: its median run)"]
    rows = [("N", "threads", "tok/s", "min", "max", "wall s", "iters", "canv/step", "step p50 ms", "p99 ms",
             "MiB/req", "prefill", "commit", "denoise", "sampling")]
    for name, lv in levels.items():
        sp, tps = lv["time_split"], lv["tokens_per_s_spread"]
        rows.append((name, str(lv["threads"]), f"{lv['tokens_per_s']:.1f}", f"{tps['min']:.1f}", f"{tps['max']:.1f}",
                     f"{lv['wall_s']:.2f}", str(lv["iterations"]), f"{lv['canvases_per_step']:.1f}",
                     f"{lv['step_ms_p50']:.1f}", f"{lv['step_ms_p99']:.1f}",
                     f"{lv['bytes_reserved_per_request'] / 2**20:.2f}", f"{sp['prefill']:.1%}", f"{sp['commit']:.1%}",
                     f"{sp['denoise']:.1%}", f"{sp['sampling']:.1%}"))
    lines += common.table(rows)
    top = max(CONCURRENCY)
    lines.append(f"batching_gain (tok/s at {top} / at 1, same threads, pairwise per repeat): "
                 f"{common.fmt_spread(gains['batching'], 'x')}")
    if "sampler_pool" in gains:
        lines.append(f"sampler_pool_gain (tok/s at {POOL_ROW} / at {top}, {levels[POOL_ROW]['threads']} vs "
                     f"{levels[str(top)]['threads']} threads: NOT an equal-budget figure; only many canvases can "
                     f"use the pool): {common.fmt_spread(gains['sampler_pool'], 'x')}")
    return lines


def extra_flags(p: argparse.ArgumentParser) -> None:
    common.add_device_flags(p)
    p.add_argument("--sampler-threads", type=int, default=2,
                   help=f"sampler threads of the extra {POOL_ROW} row (K-1 threads above the budget; "
                        "default 2; 1: no such row)")


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args(__doc__, QUICK, FULL, argv, extra_flags)
    load = common.LoadWatch()
    folder = common.ensure_checkpoint(args.bench_dir)
    from dgserve.model.loader import load_checkpoint

    ck = load_checkpoint(folder, dtype=args.dtype, device=args.device)
    prompt = common.make_prompt(folder, args.prompt_len)
    config = {"preset": common.PRESET, "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens,
              "max_denoising_steps": args.max_denoising_steps, "threads": args.threads, "repeats": args.repeats,
              "seed": args.seed, "quick": args.quick, "device": args.device, "dtype": args.dtype,
              "torch": torch.__version__, "python": platform.python_version()}
    base = common.dgserve_threads(args.threads)
    rows = {str(n): (n, base) for n in CONCURRENCY}
    if args.sampler_threads > 1:
        rows[POOL_ROW] = (max(CONCURRENCY), dataclasses.replace(base, sampler_pool=args.sampler_threads - 1))
    pool = {POOL_ROW: rows[POOL_ROW][1]} if POOL_ROW in rows else {}
    thread_lines, threads_json = common.threads_report(args.threads, common.DGSERVE_RULE, {"N=1,4,16": base}, pool,
                                                       per="row")

    warm = argparse.Namespace(**{**vars(args), "max_new_tokens": 64, "max_denoising_steps": 2})
    run_level(ck.model, ck.generation, prompt, 2, warm, base)
    runs: dict[str, list[dict]] = {row: [] for row in rows}
    for _ in range(args.repeats):
        for row, (n, threads) in rows.items():
            runs[row].append(run_level(ck.model, ck.generation, prompt, n, args, threads))
    tokens = equal_work(runs, exact=args.device == "cpu" and args.dtype == "float32")
    load_json = load.finish(own=max(t.total for _, t in rows.values()))

    def gain(a: str, b: str) -> dict:
        return common.spread(common.pairwise_ratios([r["tokens_per_s"] for r in runs[a]],
                                                    [r["tokens_per_s"] for r in runs[b]]))

    top = str(max(CONCURRENCY))
    gains = {"batching": gain(top, "1"), "at_4": gain("4", "1")}
    if POOL_ROW in runs:
        gains["sampler_pool"] = gain(POOL_ROW, top)
    levels = {row: common.median_run(rs) for row, rs in runs.items()}
    for lv in levels.values():
        lv.pop("token_ids")
    lines = report_lines(config, levels, gains) + thread_lines
    lines += common.token_lines(tokens, "request i in every row and repeat")
    print("\n".join(lines + common.load_lines(load_json)))
    if args.json:
        pool = levels.get(POOL_ROW)
        print(json.dumps({
            "config": config, "levels": [levels[str(n)] for n in CONCURRENCY],
            "batching_gain": gains["batching"]["median"], "batching_gain_spread": gains["batching"],
            "gain_at_4": gains["at_4"]["median"],
            "sampler_pool": None if pool is None else {"level": pool, "gain": gains["sampler_pool"]["median"],
                                                       "gain_spread": gains["sampler_pool"]},
            "threads": threads_json, "batch_invariant": tokens["same_tokens"],
            "token_agreement": tokens["agreement"], "mismatches": tokens["mismatches"], "load": load_json,
            "contended": load_json["contended"]}))
    return 1 if tokens["same_tokens"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
