"""Shared by the benchmarks: the checkpoint and prompt, the flags, the thread budget, the load check, repeat
summaries, the equal-work (same tokens) check and the table printer.

Thread budget (--threads N, default 1): every comparison gives both sides the same number of threads, counting
every thread that works for a side: torch intra-op threads, plus dgserve's noise worker (sampler noise drawn on a
worker thread while the forward runs; CPU only), plus the engine executor's sampler pool (sampler_threads - 1
extra threads: sampler_threads counts the driver thread).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dgserve.cluster.engine.metrics import percentile

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BENCH_DIR = REPO_ROOT / ".bench"
PRESET = "bench"
CKPT_SEED = 0

PROMPT_TEXT = (
    "Block diffusion writes text a canvas at a time: the canvas starts as noise and is refined over "
    "several denoising steps, the confident tokens are kept and the rest are drawn again. Once the canvas is "
    "stable it is committed to the cache and the next block begins. The quick brown fox jumps over the "
    "lazy dog. What is the capital of France? Paris is the capital of France. def add(a, b): return a + b. "
)

# ----------------------------------------------------------------------------------------------- checkpoint


def ensure_checkpoint(bench_dir: Path) -> Path:
    """The benchmark checkpoint, made once (atomically: a half-written folder is never reused)."""
    target = bench_dir / f"gen-{PRESET}-v2-seed{CKPT_SEED}"  # v2: the vision tower and processor files
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


# ----------------------------------------------------------------------------------------------- flags

WORKLOAD = ("prompt_len", "max_new_tokens", "max_denoising_steps", "repeats")
WORKLOAD_HELP = {"prompt_len": "prompt tokens", "max_new_tokens": "new tokens (whole 64-token blocks)",
                 "max_denoising_steps": "denoising steps per block", "repeats": "timed runs of each side"}


def parse_args(doc: str, quick: dict, full: dict, argv: Sequence[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The flags every benchmark shares (workload, --quick, --threads, --seed, --bench-dir, --json), plus
    `extra(parser)`. `quick` and `full` give the workload defaults (max_denoising_steps None: the checkpoint's)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the short workload (seconds to a minute or two)")
    for k in WORKLOAD:
        default = "the checkpoint's" if full[k] is None else full[k]
        p.add_argument(f"--{k.replace('_', '-')}", type=int,
                       help=f"{WORKLOAD_HELP[k]} (default {default}; quick {quick[k]})")
    p.add_argument("--threads", type=int, default=1,
                   help="thread budget per side: torch threads plus helper threads (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (request i uses seed + i)")
    p.add_argument("--bench-dir", type=Path, default=DEFAULT_BENCH_DIR, help="where the checkpoint is cached")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("prompt_len", "max_new_tokens", "max_denoising_steps", "repeats", "threads"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    return args


def add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", default="float32",
                   help="float32 | bfloat16 (tokens are checked exactly in float32; engine.py: on CPU)")


# ----------------------------------------------------------------------------------------------- threads


@dataclass(frozen=True)
class Threads:
    """The threads one side works with."""

    torch: int  # torch.set_num_threads
    noise_worker: int = 0  # 1: sampler noise drawn on dgserve's worker thread (prefetch_noise)
    sampler_pool: int = 0  # the executor's extra sampler threads (EngineConfig.sampler_threads - 1)

    @property
    def total(self) -> int:
        return self.torch + self.noise_worker + self.sampler_pool

    @property
    def prefetch(self) -> bool:
        return self.noise_worker > 0

    @property
    def sampler_threads(self) -> int:
        return self.sampler_pool + 1

    def describe(self) -> str:
        parts = [f"torch {self.torch}"]
        if self.noise_worker:
            parts.append(f"noise worker {self.noise_worker}")
        if self.sampler_pool:
            parts.append(f"sampler pool {self.sampler_pool}")
        return f"{self.total} = " + " + ".join(parts)

    def as_json(self) -> dict:
        return {"total": self.total, "torch": self.torch, "noise_worker": self.noise_worker,
                "sampler_pool": self.sampler_pool, "prefetch_noise": self.prefetch,
                "sampler_threads": self.sampler_threads}


DGSERVE_RULE = ("dgserve: N torch threads, the noise drawn inline (no noise worker), no sampler pool; float32 "
                "results, and so the sampled tokens, depend on torch's thread count, so the budget cannot buy "
                "dgserve a helper thread at the cost of a torch thread without changing its work")


def dgserve_threads(budget: int) -> Threads:
    """dgserve's threads for a budget of `budget` threads (DGSERVE_RULE): the reference's torch threads, no helper
    threads."""
    if budget < 1:
        raise ValueError(f"a thread budget is >= 1, not {budget}")
    return Threads(torch=budget)


UNIT_RULE = ("both sides run the same engine settings: N torch threads, the noise drawn inline (engine "
             "noise_prefetch off), plus the sampler pool when --sampler-threads asks for one")


def unit_threads(budget: int, sampler_threads: int = 1) -> Threads:
    """The engine threads of both sides of cluster.py and serve.py (UNIT_RULE)."""
    if budget < 1 or sampler_threads < 1:
        raise ValueError(f"budget and sampler_threads are >= 1, not {budget} and {sampler_threads}")
    return Threads(torch=budget, sampler_pool=sampler_threads - 1)


def threads_report(budget: int, rule: str, sides: dict[str, Threads], above: dict[str, Threads] | None = None,
                   per: str = "side") -> tuple[list[str], dict]:
    """Lines naming each side's threads (a loud warning when the sides' totals differ) and the JSON `threads`
    object. `above`: rows that deliberately run with more threads (own rows, never in an equal-budget ratio)."""
    above = above or {}
    equal = len({t.total for t in sides.values()}) == 1
    width = max(map(len, {**sides, **above}))
    lines = [f"threads: budget N = {budget} per {per}; {rule}"]
    lines += [f"  {name:<{width}}  {t.describe()}" for name, t in sides.items()]
    lines += [f"  {name:<{width}}  {t.describe()}  (above the budget: its own row)" for name, t in above.items()]
    if not equal:
        lines.append("WARNING: UNEQUAL THREAD BUDGETS: " + ", ".join(f"{n} {t.total}" for n, t in sides.items())
                     + " threads; the ratio is NOT an equal-resources comparison")
    out = {"budget": budget, "rule": rule, "equal": equal} | {n: t.as_json() for n, t in {**sides, **above}.items()}
    return lines, out


# ----------------------------------------------------------------------------------------------- load

BUSY_PER_CORE = 0.5  # 1-minute load per core beyond the benchmark's own threads that counts as a busy machine


def load_verdict(before: float, after: float, cpus: int, own: int) -> list[str]:
    """Warnings when the machine looks busy ([] when it does not). `before`, `after`: 1-minute load averages at
    the start and the end; `own`: threads the benchmark itself keeps busy (before the run: this process only)."""
    slack = BUSY_PER_CORE * cpus
    out = []
    if before > 1 + slack:
        out.append(f"WARNING: machine busy before the run: 1-minute load {before:.2f} on {cpus} cpus, above "
                   f"{1 + slack:.2f} (this process + {BUSY_PER_CORE} per core); timings are not trustworthy")
    if after > own + slack:
        out.append(f"WARNING: machine busy during the run: 1-minute load {after:.2f} on {cpus} cpus, above "
                   f"{own + slack:.2f} (the benchmark's {own} threads + {BUSY_PER_CORE} per core); timings are "
                   f"not trustworthy")
    return out


class LoadWatch:
    """os.getloadavg() at creation and at `finish`, and the verdict."""

    def __init__(self) -> None:
        self.cpus = os.cpu_count() or 1
        self.before = os.getloadavg()

    def finish(self, own: int) -> dict:
        after = os.getloadavg()
        warnings = load_verdict(self.before[0], after[0], self.cpus, own)
        return {"cpu_count": self.cpus, "load_before": [round(x, 2) for x in self.before],
                "load_after": [round(x, 2) for x in after], "own_threads": own, "contended": bool(warnings),
                "warnings": warnings}


def load_lines(load: dict) -> list[str]:
    return [f"load (1/5/15 min): before {'/'.join(f'{x:.2f}' for x in load['load_before'])}, after "
            f"{'/'.join(f'{x:.2f}' for x in load['load_after'])} on {load['cpu_count']} cpus; "
            f"contended: {load['contended']}"] + load["warnings"]


# ----------------------------------------------------------------------------------------------- repeats


def spread(values: Sequence[float]) -> dict:
    """min / median / max; the median is the middle value (the upper middle for an even count), so it is one of
    the runs."""
    if not values:
        raise ValueError("no values")
    return {"min": min(values), "median": percentile(values, 0.5), "max": max(values), "n": len(values)}


def pairwise_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """num[i] / den[i]: the ratio of each repeat's pair of runs."""
    if len(num) != len(den):
        raise ValueError(f"{len(num)} vs {len(den)} runs")
    return [a / b for a, b in zip(num, den, strict=True)]


def fmt_spread(s: dict, unit: str = "", digits: int = 2) -> str:
    med = f"{s['median']:.{digits}f}{unit}"
    if s["n"] == 1:
        return f"{med} (1 run)"
    return f"{med} median of {s['n']} (min {s['min']:.{digits}f}, max {s['max']:.{digits}f})"


def median_run(runs: Sequence[dict], key: str = "tokens_per_s") -> dict:
    """The run whose `key` is the spread's median, with `<key>_spread` and `repeats` added."""
    s = spread([r[key] for r in runs])
    run = next(r for r in runs if r[key] == s["median"])
    return {**run, f"{key}_spread": s, "repeats": len(runs)}


# ----------------------------------------------------------------------------------------------- equal work


def first_difference(expected: Sequence[int], got: Sequence[int]) -> str | None:
    """Where two id lists first differ (None when they are equal)."""
    for i, (a, b) in enumerate(zip(expected, got, strict=False)):
        if a != b:
            return f"first difference at generated index {i}: {a} vs {b}"
    if len(expected) != len(got):
        return f"lengths differ ({len(expected)} vs {len(got)})"
    return None


def check_tokens(pairs: Iterable[tuple[str, Sequence[int], Sequence[int]]], exact: bool = True) -> dict:
    """Compare (label, expected ids, got ids) pairs. `exact` False (bf16, GPU): agreement is reported, not
    checked. Returns {same_tokens (True/False, None when not checked), agreement, compared, tokens, mismatches}."""
    pairs = list(pairs)
    mismatches = [f"{label}: {d}" for label, a, b in pairs if (d := first_difference(a, b)) is not None]
    tokens = sum(len(a) for _, a, _ in pairs)
    same = sum(x == y for _, a, b in pairs for x, y in zip(a, b, strict=False))
    return {"same_tokens": (not mismatches) if exact else None, "agreement": same / max(1, tokens),
            "compared": len(pairs), "tokens": tokens, "mismatches": mismatches}


def token_lines(check: dict, what: str) -> list[str]:
    """The equal-work verdict; a TOKEN MISMATCH line per difference when checked."""
    n = f"{check['compared']} comparisons, {check['tokens']} tokens"
    if check["same_tokens"] is None:
        return [f"equal work: not checked exactly (bf16, or batching on GPU); token agreement "
                f"{check['agreement']:.1%} ({n})"]
    if check["same_tokens"]:
        return [f"equal work: {what} produced the same tokens ({n})"]
    return [f"TOKEN MISMATCH: {m}" for m in check["mismatches"]] + [
        f"equal work FAILED: {len(check['mismatches'])} of {check['compared']} comparisons differ "
        f"(agreement {check['agreement']:.1%}); the timings compare different work"]


# ----------------------------------------------------------------------------------------------- output


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows of cells as aligned lines: the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)])
            for r in rows]


# ----------------------------------------------------------------------------------------------- two engines


RAY_NOTE = ("the Ray side also runs processes outside the budget that relay but do not compute: the Serve replica, "
            "{extra}Ray's raylet, GCS and core workers")


def stream_table(rows: dict[str, dict[int, dict]], threads_per_side: int, first: str) -> list[str]:
    """serve.py's and chat.py's table: per side and N, tokens/s (median run, min, max), wall time, time to the
    first streamed message (`first` names it) and between messages (`summarize_streams` rows)."""
    out = [("side", "N", "threads", "tok/s", "min", "max", "wall s", f"{first} p50 ms", "between p50", "p99 ms")]
    for side, levels in rows.items():
        for n, lv in levels.items():
            tps = lv["tokens_per_s_spread"]
            out.append((side, str(n), str(threads_per_side), f"{lv['tokens_per_s']:.1f}", f"{tps['min']:.1f}",
                        f"{tps['max']:.1f}", f"{lv['wall_s']:.2f}", f"{lv['ttfb_ms_p50']:.1f}",
                        f"{lv['between_blocks_ms_p50']:.1f}", f"{lv['between_blocks_ms_p99']:.1f}"))
    return table(out)


def summarize_streams(n: int, runs: list[tuple[float, list[float], list[int]]], wall: float) -> dict:
    """runs: (start, message arrival times, final token ids) per request."""
    from dgserve.cluster.engine.metrics import percentile

    ttfb = [times[0] - start for start, times, _ in runs if times]
    gaps = [b - a for _, times, _ in runs for a, b in zip(times, times[1:], strict=False)]
    tokens = sum(len(ids) for _, _, ids in runs)
    return {"concurrency": n, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttfb_ms_p50": 1000 * percentile(ttfb, 0.5), "between_blocks_ms_p50": 1000 * percentile(gaps, 0.5),
            "between_blocks_ms_p99": 1000 * percentile(gaps, 0.99), "token_ids": [ids for _, _, ids in runs]}


def add_unit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler-threads", type=int, default=1,
                   help="the engine's sampler threads on both sides (K-1 pool threads on top of the budget; "
                        "default 1)")


def engine_config(threads: Threads, max_running: int) -> dict:
    """The engine settings of both sides of cluster.py and serve.py (the Ray unit's `engine` section)."""
    return {"max_running": max_running, "cpu_threads": threads.torch, "sampler_threads": threads.sampler_threads,
            "noise_prefetch": threads.prefetch}


# A unit's default watchdog (10 s) fails every request when one iteration of 32 canvases on one torch thread runs
# longer, which it does on a busy 2-core machine.
WATCHDOG_S = 300.0


def unit_topology(folder: Path, engine: dict, threads: Threads, **extra) -> dict:
    """The Ray unit of cluster.py and serve.py: the bench checkpoint and the given engine settings."""
    return {"name": "bench", "model": str(folder), "engine": engine, "watchdog_s": WATCHDOG_S,
            "resources": {"attention": {"cpus": threads.total}}, **extra}


def compare_sides(runs: dict[str, dict[int, list[dict]]], base: str, other: str) -> tuple[dict, dict, dict]:
    """Two engines that ran the same requests: runs[side][N] holds one result per repeat (with `tokens_per_s` and
    the per-request `token_ids`). Returns the rows (each side's median run per N, ids dropped), the ratio other /
    base of tokens/s at the largest N (pairwise per repeat), and the token check of request i of every repeat."""
    top = max(runs[base])
    ratio = spread(pairwise_ratios([r["tokens_per_s"] for r in runs[other][top]],
                                   [r["tokens_per_s"] for r in runs[base][top]]))
    pairs = []
    for n, base_runs in runs[base].items():
        for k, (ra, rb) in enumerate(zip(base_runs, runs[other][n], strict=True)):
            pairs += [(f"N={n} run {k} request {i}", a, b)
                      for i, (a, b) in enumerate(zip(ra["token_ids"], rb["token_ids"], strict=True))]
    tokens = check_tokens(pairs)
    rows = {side: {n: {k: v for k, v in median_run(rs).items() if k != "token_ids"} for n, rs in by_n.items()}
            for side, by_n in runs.items()}
    return rows, ratio, tokens


def report_unit_comparison(runs: dict, sides: tuple[str, str], ratio_name: str, config: dict, report_lines: Callable,
                           thread_lines: list[str], threads_json: dict, note: str, load_json: dict,
                           as_json: bool) -> int:
    """The end of cluster.py and serve.py: compare the sides (same tokens, the ratio at the largest N), print the
    table, the threads and the load, and the JSON line; the exit status (1 when the tokens differ)."""
    rows, ratio, tokens = compare_sides(runs, *sides)
    lines = report_lines(config, rows, ratio) + thread_lines + [f"  note: {note}"]
    lines += token_lines(tokens, "both sides (request i, every N and repeat)")
    print("\n".join(lines + load_lines(load_json)))
    if as_json:
        print(json.dumps({"config": config, "levels": {side: list(by_n.values()) for side, by_n in rows.items()},
                          ratio_name: ratio["median"], f"{ratio_name}_spread": ratio,
                          "threads": threads_json | {"note": note}, "same_tokens": tokens["same_tokens"],
                          "mismatches": tokens["mismatches"], "load": load_json, "contended": load_json["contended"]}))
    return 0 if tokens["same_tokens"] else 1
