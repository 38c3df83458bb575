"""CPU benchmark: dgserve single-request generation vs the transformers 5.23.0 reference, batch 1.

Both sides load the same checkpoint (`make_tiny(preset="bench")`, seed 0, cached under `.bench/`) in float32
and generate from the same prompt with the same seed and sampler settings, so the generated ids must be
identical; the script exits non-zero when they are not. Runs alternate (reference, dgserve, reference, ...)
in one process after one warm-up run per side, and the median wall time per side is reported.

    python benchmarks/generate.py --quick            # 1 block, 16 steps, 1 repeat (seconds)
    python benchmarks/generate.py                    # 2 blocks, the checkpoint's 48 steps, 3 repeats
    python benchmarks/generate.py --quick --profile  # + torch.profiler split of self CPU time per side
    python benchmarks/generate.py --json             # + one JSON object on the last line of stdout
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BENCH_DIR = REPO_ROOT / ".bench"
PRESET = "bench"
CKPT_SEED = 0

QUICK = {"prompt_len": 32, "max_new_tokens": 64, "max_denoising_steps": 16, "repeats": 1}
# max_denoising_steps None: the checkpoint's own (48 for the bench preset).
FULL = {"prompt_len": 128, "max_new_tokens": 128, "max_denoising_steps": None, "repeats": 3}

PROMPT_TEXT = (
    "Block diffusion writes text a canvas at a time: the canvas starts as noise and is refined over "
    "several denoising steps, the confident tokens are kept and the rest are drawn again. Once the canvas is "
    "stable it is committed to the cache and the next block begins. The quick brown fox jumps over the "
    "lazy dog. What is the capital of France? Paris is the capital of France. def add(a, b): return a + b. "
)

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


# ----------------------------------------------------------------------------------------------- setup


def ensure_checkpoint(bench_dir: Path) -> Path:
    """The benchmark checkpoint, made once (atomically: a half-written folder is never reused)."""
    target = bench_dir / f"gen-{PRESET}-seed{CKPT_SEED}"
    if (target / "model.safetensors.index.json").is_file():
        return target
    from dgserve.model.tiny import make_tiny

    bench_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=bench_dir))
    try:
        make_tiny(tmp, seed=CKPT_SEED, preset=PRESET)
        tmp.rename(target)
    except OSError:
        if not (target / "model.safetensors.index.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def make_prompt(folder: Path, length: int) -> list[int]:
    """`length` ids: <bos> then the checkpoint tokenizer's encoding of a fixed text, repeated as needed."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    body = tok.encode(PROMPT_TEXT, add_special_tokens=False).ids
    ids = [2]
    while len(ids) < length:
        ids.extend(body)
    return ids[:length]


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
                 device: str = "cpu", dtype: str = "float32", prefetch: bool = True):
        import transformers
        from transformers import DiffusionGemmaForBlockDiffusion

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.model = DiffusionGemmaForBlockDiffusion.from_pretrained(
            folder, dtype=getattr(torch, dtype), attn_implementation="sdpa").to(device).eval()
        self.prompt = torch.tensor(prompt, dtype=torch.long, device=device)
        self.device = device
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
                 device: str = "cpu", dtype: str = "float32", prefetch: bool = True):
        from dgserve.model.loader import load_checkpoint
        from dgserve.model.sampler import SamplerSettings

        self.ck = load_checkpoint(folder, dtype=dtype, device=device)
        self.prefetch = prefetch
        self.settings = SamplerSettings.from_defaults(self.ck.generation, max_new_tokens=max_new_tokens,
                                                      max_denoising_steps=steps)
        self.prompt, self.seed = prompt, seed

    def __call__(self) -> Run:
        from dgserve.model.generate import generate

        t0 = time.perf_counter()
        res = generate(self.ck.model, self.prompt, self.settings, seed=self.seed, prefetch_noise=self.prefetch)
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


def summarize(runs: list[Run], n_tokens: int) -> dict:
    med = statistics.median(r.total_s for r in runs)
    passes = runs[0].passes
    out = {
        "tokens_per_s": n_tokens / med,
        "passes_per_s": passes / med,
        "total_s": med,
        "total_s_runs": [r.total_s for r in runs],
        "generated_tokens": n_tokens,
        "decoder_passes": passes,
        "steps_per_block": runs[0].steps_per_block,
        "tokens_per_forward": runs[0].tokens_per_forward,
    }
    if runs[0].timings:
        out["timings_median_s"] = {k: statistics.median(r.timings[k] for r in runs) for k in runs[0].timings}
    return out


def first_mismatch(a: list[int], b: list[int]) -> str:
    if len(a) != len(b):
        return f"lengths differ ({len(a)} vs {len(b)})"
    i = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    return f"first difference at generated index {i}: {a[i]} vs {b[i]}"


def print_table(config: dict, ref: dict, ours: dict, speedup: float, exact: bool) -> None:
    print(f"dgserve generate benchmark  (preset {config['preset']}, prompt {config['prompt_len']}, "
          f"max_new_tokens {config['max_new_tokens']}, max_denoising_steps {config['max_denoising_steps']}, "
          f"threads {config['threads']}, repeats {config['repeats']}, median)")
    rows = [("", "tokens/s", "passes/s", "total s", "passes", "steps/block")]
    for name, s in (("reference", ref), ("dgserve", ours)):
        rows.append((name, f"{s['tokens_per_s']:.2f}", f"{s['passes_per_s']:.2f}", f"{s['total_s']:.3f}",
                     str(s["decoder_passes"]), ",".join(map(str, s["steps_per_block"]))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        print("  " + "  ".join(cells))
    if "timings_median_s" in ours:
        t = ours["timings_median_s"]
        print("  dgserve split: " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()))
    print(f"speedup_vs_reference {speedup:.2f}x   token_exact {exact}")


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="short run: prompt 32, max_new_tokens 64 (1 block), 16 steps, 1 repeat")
    p.add_argument("--prompt-len", type=int, help="prompt tokens (default 128; quick 32)")
    p.add_argument("--max-new-tokens", type=int, help="new tokens (default 128 = 2 blocks; quick 64)")
    p.add_argument("--max-denoising-steps", type=int,
                   help="denoising steps per block (default: the checkpoint's, 48; quick 16)")
    p.add_argument("--repeats", type=int, help="timed runs per side after one warm-up (default 3; quick 1)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 (token-exactness is checked in float32)")
    p.add_argument("--no-prefetch", action="store_true",
                   help="draw dgserve's sampler noise inline instead of on a worker thread during the forward")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for both sides")
    p.add_argument("--bench-dir", type=Path, default=DEFAULT_BENCH_DIR,
                   help="where the benchmark checkpoint is cached (default: <repo>/.bench)")
    p.add_argument("--profile", action="store_true",
                   help="also run torch.profiler once per side and report the self CPU time split")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("prompt_len", "max_new_tokens", "repeats", "threads"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = ensure_checkpoint(args.bench_dir)

    from dgserve.model.config import load_generation_defaults

    steps = args.max_denoising_steps or load_generation_defaults(folder).max_denoising_steps
    prompt = make_prompt(folder, args.prompt_len)
    config = {
        "preset": PRESET, "checkpoint_seed": CKPT_SEED, "prompt_len": args.prompt_len,
        "max_new_tokens": args.max_new_tokens, "max_denoising_steps": steps, "threads": args.threads,
        "repeats": args.repeats, "seed": args.seed, "quick": args.quick,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
    }
    config |= {"device": args.device, "dtype": args.dtype, "noise_prefetch": not args.no_prefetch}
    sides = [cls(folder, prompt, args.max_new_tokens, steps, args.seed, device=args.device, dtype=args.dtype,
                 prefetch=not args.no_prefetch) for cls in (Reference, Dgserve)]

    runs: dict[str, list[Run]] = {s.name: [] for s in sides}
    for s in sides:  # warm-up (not timed, but its ids are checked too)
        runs[s.name].append(s())
    for _ in range(args.repeats):
        for s in sides:
            runs[s.name].append(s())

    expected = runs["reference"][0].ids
    problems = [f"{name} run {i}: {first_mismatch(expected, r.ids)}"
                for name, rs in runs.items() for i, r in enumerate(rs) if r.ids != expected]
    ref_r, our_r = runs["reference"][0], runs["dgserve"][0]
    if not problems and ref_r.steps_per_block != our_r.steps_per_block:
        problems.append(f"steps per block differ: reference {ref_r.steps_per_block} vs dgserve "
                        f"{our_r.steps_per_block}")
    exact = not problems
    if args.dtype != "float32":  # bf16 kernels differ between the two stacks: report agreement, not exactness
        ours_ids = runs["dgserve"][0].ids
        same = sum(a == b for a, b in zip(expected, ours_ids, strict=False))
        config["bf16_token_agreement"] = same / max(1, len(expected))
        problems, exact = [], None

    n_tokens = len(expected)
    ref = summarize(runs["reference"][1:], n_tokens)
    ours = summarize(runs["dgserve"][1:], len(our_r.ids))
    speedup = ours["tokens_per_s"] / ref["tokens_per_s"]
    print_table(config, ref, ours, speedup, exact)

    prof = None
    if args.profile:
        prof = {s.name: profile_once(s) for s in sides}
        print_profile(prof)

    for msg in problems:
        print(f"TOKEN MISMATCH: {msg}")
    if args.json:
        result = {"config": config, "reference": ref, "dgserve": ours, "speedup_vs_reference": speedup,
                  "token_exact": exact, "mismatches": problems, "profile": prof}
        print(json.dumps(result))
    return 1 if exact is False else 0


if __name__ == "__main__":
    sys.exit(main())
