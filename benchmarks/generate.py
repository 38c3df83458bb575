"""CPU benchmark: dgserve single-request generation vs the transformers 5.23.0 reference, batch 1.

Both sides load the same checkpoint (`make_tiny(preset="bench")`, seed 0, cached under `.bench/`) in float32
and generate from the same prompt with the same seed and sampler settings, so the generated ids must be
identical; the script exits non-zero when they are not. Both sides get the same thread budget (--threads N):
N torch threads each and no helper thread (dgserve draws its sampler noise inline; --unequal adds its noise
worker and says so). Runs alternate (reference, dgserve, reference, ...) in one process after one warm-up run
per side; torch's thread count is set before each run. Reported: min / median / max per side and of the
pairwise speed-up.

    python benchmarks/generate.py --quick              # 1 block, 16 steps, 1 repeat (seconds)
    python benchmarks/generate.py                      # 2 blocks, the checkpoint's 48 steps, 3 repeats
    python benchmarks/generate.py --quick --threads 2  # a budget of 2 threads per side
    python benchmarks/generate.py --quick --unequal    # dgserve + its noise worker thread (budgets differ)
    python benchmarks/generate.py --quick --profile    # + torch.profiler split of self CPU time per side
    python benchmarks/generate.py --json               # + one JSON object on the last line of stdout
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import Threads  # noqa: E402

QUICK = {"prompt_len": 32, "max_new_tokens": 64, "max_denoising_steps": 16, "repeats": 1}
# max_denoising_steps None: the checkpoint's own (48 for the bench preset).
FULL = {"prompt_len": 128, "max_new_tokens": 128, "max_denoising_steps": None, "repeats": 3}
REFERENCE_RULE = "reference: N torch threads; "

# Profile categories, by op name (self CPU time; composite ops' children are counted where they run).
CATEGORIES = {
    "matmul": {
        "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
        "aten::_grouped_mm", "aten::einsum", "aten::scaled_dot_product_attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
    },
    "sampler_noise": {
        "aten::exponential_", "aten::multinomial", "aten::randint", "aten::random_", "aten::uniform_",
    },
    "softmax_entropy": {
        "aten::_softmax", "aten::softmax", "aten::logsumexp", "aten::_log_softmax", "aten::log_softmax",
        "aten::sort", "aten::cumsum",
    },
}
CATEGORY_ORDER = ("matmul", "sampler_noise", "softmax_entropy", "other")
TOP_OPS = 8


# ----------------------------------------------------------------------------------------------- runners


@dataclass
class Run:
    ids: list[int]
    total_s: float
    passes: int
    steps_per_block: list[int]
    tokens_per_forward: float
    timings: dict[str, float] = field(default_factory=dict)


class Reference:
    """transformers' DiffusionGemmaForBlockDiffusion.generate, with decoder passes counted per block."""

    name = "reference"

    def __init__(self, folder: Path, prompt: list[int], max_new_tokens: int, steps: int, seed: int,
                 threads: Threads, device: str = "cpu", dtype: str = "float32"):
        import transformers
        from transformers import DiffusionGemmaForBlockDiffusion

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.model = DiffusionGemmaForBlockDiffusion.from_pretrained(
            folder, dtype=getattr(torch, dtype), attn_implementation="sdpa").to(device).eval()
        self.prompt = torch.tensor(prompt, dtype=torch.long, device=device)
        self.device, self.threads = device, threads
        self.max_new_tokens, self.steps, self.seed = max_new_tokens, steps, seed
        self._blocks: list[int] = []
        # generate() runs the encoder (a module call) once per block, then `self.forward` once per denoising
        # step: a pre-hook opens a block, and an instance attribute shadowing `forward` counts the steps.
        self.model.model.encoder.register_forward_pre_hook(lambda *_: self._blocks.append(0))
        inner = self.model.forward

        def counted_forward(*args, **kwargs):
            self._blocks[-1] += 1
            return inner(*args, **kwargs)

        self.model.forward = counted_forward

    def __call__(self) -> Run:
        torch.set_num_threads(self.threads.torch)  # process-wide: set again before every run of this side
        self._blocks = []
        with torch.inference_mode():
            t0 = time.perf_counter()
            torch.manual_seed(self.seed)
            out = self.model.generate(self.prompt[None], max_new_tokens=self.max_new_tokens,
                                      max_denoising_steps=self.steps)
            if self.device != "cpu":
                torch.cuda.synchronize()
            total = time.perf_counter() - t0
        ids = out.sequences[0, self.prompt.numel():].tolist()
        blocks = list(self._blocks)
        return Run(ids, total, sum(blocks), blocks, float(out.tokens_per_forward.reshape(-1)[0]))


class Dgserve:
    name = "dgserve"

    def __init__(self, folder: Path, prompt: list[int], max_new_tokens: int, steps: int, seed: int,
                 threads: Threads, device: str = "cpu", dtype: str = "float32"):
        from dgserve.model.loader import load_checkpoint
        from dgserve.model.sampler import SamplerSettings

        self.ck = load_checkpoint(folder, dtype=dtype, device=device)
        self.threads = threads
        self.settings = SamplerSettings.from_defaults(self.ck.generation, max_new_tokens=max_new_tokens,
                                                      max_denoising_steps=steps)
        self.prompt, self.seed = prompt, seed

    def __call__(self) -> Run:
        from dgserve.model.generate import generate

        torch.set_num_threads(self.threads.torch)
        t0 = time.perf_counter()
        res = generate(self.ck.model, self.prompt, self.settings, seed=self.seed,
                       prefetch_noise=self.threads.prefetch)
        total = time.perf_counter() - t0
        return Run(list(res.token_ids), total, res.decoder_passes, list(res.steps_per_block),
                   float(res.tokens_per_forward), dict(res.timings))


# ----------------------------------------------------------------------------------------------- profile


def categorize(name: str) -> str:
    for cat, names in CATEGORIES.items():
        if name in names:
            return cat
    return "other"


def profile_once(side) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run = side()
    ops = [(e.key, float(e.self_cpu_time_total), int(e.count)) for e in prof.key_averages()]
    total_us = sum(t for _, t, _ in ops) or 1.0
    cats = dict.fromkeys(CATEGORY_ORDER, 0.0)
    for name, t, _ in ops:
        cats[categorize(name)] += t
    top = sorted(ops, key=lambda o: -o[1])[:TOP_OPS]
    return {
        "wall_s": run.total_s,
        "self_cpu_total_ms": total_us / 1e3,
        "categories_pct": {c: 100.0 * t / total_us for c, t in cats.items()},
        "top_ops": [{"op": n, "category": categorize(n), "self_cpu_ms": t / 1e3, "pct": 100.0 * t / total_us,
                     "calls": c} for n, t, c in top],
    }


# ----------------------------------------------------------------------------------------------- report


def summarize(runs: list[Run], threads: Threads) -> dict:
    """One side's timed runs: tokens/s and passes/s at the median time, and the time's min / median / max."""
    times = common.spread([r.total_s for r in runs])
    n_tokens, passes = len(runs[0].ids), runs[0].passes
    out = {
        "threads": threads.total,
        "tokens_per_s": n_tokens / times["median"],
        "passes_per_s": passes / times["median"],
        "total_s": times["median"],
        "total_s_spread": times,
        "total_s_runs": [r.total_s for r in runs],
        "generated_tokens": n_tokens,
        "decoder_passes": passes,
        "steps_per_block": runs[0].steps_per_block,
        "tokens_per_forward": runs[0].tokens_per_forward,
    }
    if runs[0].timings:
        out["timings_median_s"] = {k: statistics.median(r.timings[k] for r in runs) for k in runs[0].timings}
    return out


def equal_work(runs: dict[str, list[Run]], exact: bool) -> dict:
    """Every run of both sides (warm-ups included) against the reference's first: the same ids and, when the ids
    are checked exactly, the same steps per block."""
    expected = runs["reference"][0]
    labelled = [(f"{name} run {i}", r) for name, rs in runs.items() for i, r in enumerate(rs)]
    check = common.check_tokens([(label, expected.ids, r.ids) for label, r in labelled], exact)
    steps = [f"{label}: steps per block {r.steps_per_block} vs the reference's {expected.steps_per_block}"
             for label, r in labelled if r.steps_per_block != expected.steps_per_block]
    if exact and steps:
        check |= {"same_tokens": False, "mismatches": check["mismatches"] + steps}
    return check


def report_lines(config: dict, ref: dict, ours: dict, speedup: dict) -> list[str]:
    lines = [f"dgserve generate benchmark  (preset {config['preset']}, prompt {config['prompt_len']}, "
             f"max_new_tokens {config['max_new_tokens']}, max_denoising_steps {config['max_denoising_steps']}, "
             f"{config['device']} {config['dtype']}, repeats {config['repeats']})"]
    rows = [("", "threads", "tokens/s", "passes/s", "total s median", "min", "max", "passes", "steps/block")]
    for name, s in (("reference", ref), ("dgserve", ours)):
        t = s["total_s_spread"]
        rows.append((name, str(s["threads"]), f"{s['tokens_per_s']:.2f}", f"{s['passes_per_s']:.2f}",
                     f"{t['median']:.3f}", f"{t['min']:.3f}", f"{t['max']:.3f}", str(s["decoder_passes"]),
                     ",".join(map(str, s["steps_per_block"]))))
    lines += common.table(rows)
    if "timings_median_s" in ours:
        lines.append("  dgserve split: " + ", ".join(f"{k} {v:.3f}" for k, v in ours["timings_median_s"].items()))
    lines.append(f"speedup_vs_reference (dgserve tok/s / reference tok/s, pairwise per repeat): "
                 f"{common.fmt_spread(speedup, 'x')}")
    return lines


def print_profile(prof: dict) -> None:
    for side in ("reference", "dgserve"):
        p = prof[side]
        split = "  ".join(f"{c} {p['categories_pct'][c]:.1f}%" for c in CATEGORY_ORDER)
        print(f"profile {side}: self CPU {p['self_cpu_total_ms']:.1f} ms (wall {p['wall_s']:.3f} s "
              f"under profiler)\n  {split}")
        for o in p["top_ops"]:
            print(f"    {o['op']:<52} {o['self_cpu_ms']:9.1f} ms {o['pct']:5.1f}%  "
                  f"{o['calls']:6d} calls  [{o['category']}]")


# ----------------------------------------------------------------------------------------------- main


def extra_flags(p: argparse.ArgumentParser) -> None:
    common.add_device_flags(p)
    p.add_argument("--unequal", action="store_true",
                   help="opt out of equal budgets: dgserve also draws its sampler noise on its worker thread, "
                        "N + 1 threads (CPU; the output says the budgets differ)")
    p.add_argument("--profile", action="store_true",
                   help="also run torch.profiler once per side and report the self CPU time split")


def side_threads(args) -> dict[str, Threads]:
    dgserve = common.dgserve_threads(args.threads)
    if args.unequal and args.device == "cpu":  # the noise worker exists only on CPU
        dgserve = Threads(dgserve.torch, noise_worker=1)
    return {"reference": Threads(args.threads), "dgserve": dgserve}


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args(__doc__, QUICK, FULL, argv, extra_flags)
    load = common.LoadWatch()
    folder = common.ensure_checkpoint(args.bench_dir)

    from dgserve.model.config import load_generation_defaults

    steps = args.max_denoising_steps or load_generation_defaults(folder).max_denoising_steps
    prompt = common.make_prompt(folder, args.prompt_len)
    config = {
        "preset": common.PRESET, "checkpoint_seed": common.CKPT_SEED, "prompt_len": args.prompt_len,
        "max_new_tokens": args.max_new_tokens, "max_denoising_steps": steps, "threads": args.threads,
        "repeats": args.repeats, "seed": args.seed, "quick": args.quick, "device": args.device, "dtype": args.dtype,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "python": platform.python_version(), "machine": platform.machine(),
    }
    threads = side_threads(args)
    thread_lines, threads_json = common.threads_report(args.threads, REFERENCE_RULE + common.DGSERVE_RULE, threads)
    sides = [cls(folder, prompt, args.max_new_tokens, steps, args.seed, threads[cls.name], args.device, args.dtype)
             for cls in (Reference, Dgserve)]

    runs: dict[str, list[Run]] = {s.name: [] for s in sides}
    for _ in range(1 + args.repeats):  # run 0 of each side is the warm-up (not timed; its ids are checked)
        for s in sides:
            runs[s.name].append(s())
    exact = args.dtype == "float32"  # in bf16 the two stacks' kernels round differently: agreement is reported
    tokens = equal_work(runs, exact)

    timed = {name: rs[1:] for name, rs in runs.items()}
    ref, ours = (summarize(timed[name], threads[name]) for name in ("reference", "dgserve"))
    tok_s = {name: [len(r.ids) / r.total_s for r in rs] for name, rs in timed.items()}
    speedup = common.spread(common.pairwise_ratios(tok_s["dgserve"], tok_s["reference"]))
    prof = {s.name: profile_once(s) for s in sides} if args.profile else None
    load_json = load.finish(own=max(t.total for t in threads.values()))

    if prof:
        print_profile(prof)
    lines = report_lines(config, ref, ours, speedup) + thread_lines
    lines += common.token_lines(tokens, "every run of both sides (warm-ups included)")
    print("\n".join(lines + common.load_lines(load_json)))
    if args.json:
        result = {"config": config, "reference": ref, "dgserve": ours, "speedup_vs_reference": speedup["median"],
                  "speedup_spread": speedup, "threads_reference": threads["reference"].total,
                  "threads_dgserve": threads["dgserve"].total, "threads": threads_json,
                  "token_exact": tokens["same_tokens"], "token_agreement": tokens["agreement"],
                  "mismatches": tokens["mismatches"], "load": load_json, "contended": load_json["contended"],
                  "profile": prof}
        print(json.dumps(result))
    return 1 if tokens["same_tokens"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
