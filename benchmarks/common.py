"""Shared by the benchmarks: the workload flags (--quick and the sizes it stands for) and the JSON switch."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

WORKLOAD = ("prompt_len", "max_new_tokens", "max_denoising_steps")


def parse_workload(doc: str, quick: dict, full: dict, argv=None,
                   extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    from benchmarks.generate import DEFAULT_BENCH_DIR

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the short workload (seconds to a minute or two)")
    for k in WORKLOAD:
        p.add_argument(f"--{k.replace('_', '-')}", type=int, help=f"default {full[k]} (quick {quick[k]})")
    p.add_argument("--bench-dir", type=Path, default=DEFAULT_BENCH_DIR, help="where the checkpoint is cached")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args
