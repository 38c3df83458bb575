"""All-to-all over torch.distributed, measured the way nccl-tests' `alltoall_perf` measures it.

`--ranks` processes (torch.multiprocessing, spawn; gloo on CPU over loopback, nccl with `--backend nccl`, one GPU
per rank) run `all_to_all_single` with equal splits for each message size from --min-bytes to --max-bytes
(doubling). The size is what one rank sends in all (size / ranks to each peer, itself included), as nccl-tests
counts it. Per size: --warmup untimed calls, then --iters timed calls; the time of a call is the slowest rank's
(gathered on rank 0), and the row shows the median. algbw = size / time; busbw = algbw x (n - 1) / n (nccl-tests'
all-to-all factor: what crosses the links). Every received element is checked against the pattern its sender
wrote (`wrong`, as nccl-tests' #wrong: must be 0). Each rank runs 1 torch thread; the ranks share this machine's
cores.

With `--nccl-tests PATH` (NVIDIA's nccl-tests build directory, on a GPU machine), its `alltoall_perf` also runs
over the same sizes and its rows join the table (source `nccl-tests`). It is not installable here.

    python benchmarks/all_to_all.py --quick
    python benchmarks/all_to_all.py --json --ranks 4 --max-bytes 67108864
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from dgserve.cluster.experts.selftest import sizes  # noqa: E402

QUICK = {"min_bytes": 1024, "max_bytes": 1 << 20, "iters": 10, "warmup": 3}
FULL = {"min_bytes": 1024, "max_bytes": 64 << 20, "iters": 30, "warmup": 5}


def parse_nccl_tests(text: str) -> list[dict]:
    """The data rows of `alltoall_perf` output: size, count, type, redop, root, time, algbw, busbw, #wrong
    (out-of-place columns)."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 9 and parts[0].isdigit() and parts[1].isdigit():
            rows.append({"source": "nccl-tests", "bytes": int(parts[0]), "time_us": float(parts[5]),
                         "algbw_gbs": float(parts[6]), "busbw_gbs": float(parts[7]), "wrong": int(parts[8])})
    return rows


def _rank_main(rank: int, world: int, backend: str, store: str, plan: list[int], iters: int, warmup: int,
               results) -> None:
    import torch
    import torch.distributed as dist

    from dgserve.cluster.experts.selftest import sweep

    if backend == "nccl":  # a GPU per rank; the gloo helper below is for CPU groups
        torch.set_num_threads(1)
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
        try:
            rows = sweep(plan, iters, warmup, device=torch.device("cuda", rank))
            if rank == 0:
                results.put(rows)
        finally:
            dist.destroy_process_group()
        return
    from dgserve.cluster.experts.local import process_group

    with process_group(rank, world, store):
        rows = sweep(plan, iters, warmup)
        if rank == 0:
            results.put(rows)


def measure(ranks: int, backend: str, plan: list[int], iters: int, warmup: int) -> list[dict]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="dgserve-a2a-") as tmp:
        procs = [ctx.Process(target=_rank_main, args=(r, ranks, backend, os.path.join(tmp, "store"), plan, iters,
                                                     warmup, results)) for r in range(ranks)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs) or results.empty():
            raise RuntimeError(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
        rows = results.get()
    return [{"source": f"torch.distributed ({backend})", **r} for r in rows]


def run_nccl_tests(path: Path, ranks: int, lo: int, hi: int) -> list[dict]:
    exe = path / "alltoall_perf" if path.is_dir() else path
    if not exe.is_file():
        raise SystemExit(f"--nccl-tests {path}: no alltoall_perf there (build NVIDIA's nccl-tests on a GPU machine)")
    out = subprocess.run([str(exe), "-b", str(lo), "-e", str(hi), "-f", "2", "-g", str(ranks)], capture_output=True,
                         text=True, timeout=600, check=True)
    return parse_nccl_tests(out.stdout)


def report(rows: Sequence[dict], ranks: int) -> list[str]:
    head = ("source", "size B", "count", "time us", "algbw GB/s", "busbw GB/s", "wrong")
    cells = [head] + [(r["source"], str(r["bytes"]), str(r.get("count", "")), f"{r['time_us']:.1f}",
                       f"{r['algbw_gbs']:.3f}", f"{r['busbw_gbs']:.3f}", str(r["wrong"])) for r in rows]
    return [f"all_to_all_single over {ranks} ranks (busbw = algbw x {ranks - 1}/{ranks}); each rank 1 torch thread, "
            f"{os.cpu_count()} cpus shared"] + common.table(cells)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="sizes 1 KiB..1 MiB, 10 timed calls each")
    p.add_argument("--ranks", type=int, default=2, help="processes (default 2; one GPU each with nccl)")
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    for k in ("min_bytes", "max_bytes", "iters", "warmup"):
        p.add_argument(f"--{k.replace('_', '-')}", type=int, help=f"default {FULL[k]} (quick {QUICK[k]})")
    p.add_argument("--nccl-tests", type=Path, help="nccl-tests build folder: run its alltoall_perf too")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.ranks < 2:
        p.error("--ranks must be >= 2 (an all-to-all needs peers)")
    if not 1 <= args.min_bytes <= args.max_bytes:
        p.error("--min-bytes must be in 1..--max-bytes")
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    watch = common.LoadWatch()
    rows = measure(args.ranks, args.backend, sizes(args.min_bytes, args.max_bytes, args.ranks), args.iters,
                   args.warmup)
    if args.nccl_tests is not None:
        rows += run_nccl_tests(args.nccl_tests, args.ranks, args.min_bytes, args.max_bytes)
    load = watch.finish(own=args.ranks)
    for line in report(rows, args.ranks) + common.load_lines(load):
        print(line)
    wrong = sum(r["wrong"] for r in rows)
    if args.json:
        print(json.dumps({"ranks": args.ranks, "backend": args.backend, "rows": rows, "wrong": wrong, "load": load,
                          "contended": load["contended"], "config": {k: getattr(args, k) for k in QUICK}}))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
