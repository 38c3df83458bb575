"""CPU benchmark: the engine's aggregate throughput at 1, 4 and 16 concurrent requests (continuous batching).

One process, the checkpoint of benchmarks/generate.py (`make_tiny(preset="bench")`: hidden 512, 8 layers,
32 experts top-4, vocab 32000, canvas 64), float32. For each concurrency N a fresh engine gets N requests at
once (the same prompt length and settings, different seeds) and runs them to the end; aggregate tokens per
second is all generated tokens over the wall time. The same request gives the same tokens at every N (checked:
batching is bitwise invisible on CPU float32), so every N does the same work per request.

    python benchmarks/engine.py --quick          # 1 block, 8 steps (about a minute)
    python benchmarks/engine.py                  # 2 blocks, 16 steps
    python benchmarks/engine.py --json           # + one JSON object on the last line (`batching_gain`)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.generate import DEFAULT_BENCH_DIR, ensure_checkpoint, make_prompt  # noqa: E402

QUICK = {"prompt_len": 32, "max_new_tokens": 64, "max_denoising_steps": 8}
FULL = {"prompt_len": 128, "max_new_tokens": 128, "max_denoising_steps": 16}
CONCURRENCY = (1, 4, 16)


def run_level(model, generation, prompt: list[int], n: int, args, tokenizer=None) -> dict:
    from dgserve.cluster.engine import Engine, EngineConfig, EngineRequest
    from dgserve.model.sampler import SamplerSettings

    settings = SamplerSettings.from_defaults(generation, max_new_tokens=args.max_new_tokens,
                                             max_denoising_steps=args.max_denoising_steps)
    engine = Engine(model, EngineConfig(max_running=max(CONCURRENCY), cpu_threads=args.threads,
                                        sampler_threads=args.sampler_threads),
                    prefetch_noise=not args.no_prefetch)
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
    latencies.sort()
    return {
        "concurrency": n, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
        "iterations": m.iterations, "canvases_per_step": m.canvas_steps / max(1, m.iterations),
        "step_ms_p50": 1000 * latencies[len(latencies) // 2],
        "step_ms_p99": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "bytes_reserved_per_request": peak_budget / n, "kv_bytes_per_request": peak_kv / n,
        "time_split": {k: v / split_total for k, v in m.time_s.items()},
        "steps_per_block": [list(r.stats.steps_per_block) for r in results],
        "token_ids": [list(r.token_ids) for r in results],
    }


def print_table(config: dict, levels: list[dict], gain: float, invariant: bool) -> None:
    print(f"engine benchmark: {config['preset']} checkpoint, prompt {config['prompt_len']}, "
          f"{config['max_new_tokens']} new tokens, {config['max_denoising_steps']} steps, "
          f"{config['threads']} torch thread(s), {config['device']} {config['dtype']}")
    print(f"{'N':>4} {'tok/s':>8} {'wall s':>8} {'iters':>6} {'canv/step':>9} {'step p50 ms':>11} "
          f"{'p99 ms':>8} {'MiB/req':>8} {'prefill':>8} {'commit':>7} {'denoise':>8} {'sampling':>9}")
    for lv in levels:
        sp = lv["time_split"]
        print(f"{lv['concurrency']:>4} {lv['tokens_per_s']:>8.1f} {lv['wall_s']:>8.2f} {lv['iterations']:>6} "
              f"{lv['canvases_per_step']:>9.1f} {lv['step_ms_p50']:>11.1f} {lv['step_ms_p99']:>8.1f} "
              f"{lv['bytes_reserved_per_request'] / 2**20:>8.2f} {sp['prefill']:>8.1%} {sp['commit']:>7.1%} "
              f"{sp['denoise']:>8.1%} {sp['sampling']:>9.1%}")
    print(f"batching_gain (tok/s at {max(CONCURRENCY)} / at 1): {gain:.2f}x   batch-invariant tokens: {invariant}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 block of 8 steps per request")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--max-denoising-steps", type=int)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the engine's cpu_threads)")
    p.add_argument("--no-prefetch", action="store_true", help="draw sampler noise on the driver thread")
    p.add_argument("--sampler-threads", type=int, help="threads for per-canvas work (default: the CPU count)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 (token checks only mean something in "
                                                       "float32 on CPU)")
    p.add_argument("--bench-dir", type=Path, default=DEFAULT_BENCH_DIR)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = ensure_checkpoint(args.bench_dir)
    from dgserve.model.loader import load_checkpoint

    ck = load_checkpoint(folder, dtype=args.dtype, device=args.device)
    prompt = make_prompt(folder, args.prompt_len)
    config = {"preset": "bench", "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens,
              "max_denoising_steps": args.max_denoising_steps, "threads": args.threads, "quick": args.quick,
              "device": args.device, "dtype": args.dtype, "noise_prefetch": not args.no_prefetch,
              "sampler_threads": args.sampler_threads or os.cpu_count(),
              "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count()}
    warm = argparse.Namespace(**{**vars(args), "max_new_tokens": 64, "max_denoising_steps": 2})
    run_level(ck.model, ck.generation, prompt, 2, warm)
    levels = [run_level(ck.model, ck.generation, prompt, n, args) for n in CONCURRENCY]
    # Request i has the same seed at every concurrency: its tokens must not depend on the batch.
    invariant = all(lv["token_ids"][i] == levels[-1]["token_ids"][i]
                    for lv in levels for i in range(lv["concurrency"]))
    if args.device != "cpu" or args.dtype != "float32":
        invariant = None  # GPU kernels and bf16 are not batch-invariant: reported, not checked
    gain = levels[-1]["tokens_per_s"] / levels[0]["tokens_per_s"]
    print_table(config, levels, gain, invariant)
    if args.json:
        for lv in levels:
            lv.pop("token_ids")
        print(json.dumps({"config": config, "levels": levels, "batching_gain": gain,
                          "gain_at_4": levels[1]["tokens_per_s"] / levels[0]["tokens_per_s"],
                          "batch_invariant": invariant}))
    return 1 if invariant is False else 0


if __name__ == "__main__":
    sys.exit(main())
