"""`dgserve fabric-check`: the expert exchange's all-to-all across pods, as the Helm chart's `helm test` hook runs
it between GPU pods (where nccl-tests' single-process alltoall_perf only sees one pod's GPUs).

Each of N pods runs `dgserve fabric-check --node-rank I --nodes N --master HOST:PORT`; each starts one process per
local GPU (global rank I x G + local), all join one torch.distributed group through the master's TCP store (bound
to the master address only, as ranks.py binds a unit's), and
rank 0 measures the sweep of `selftest.sweep` (the units' start-up self-test, nccl-tests' busbw definition). Node 0
prints nccl-tests-style rows and "# Avg bus bandwidth : X" (the mean busbw over the sizes), and exits 1 when X is
under --min-busbw or any element arrived wrong. With --backend gloo it runs on CPUs (how the tests run it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import socket
import statistics
import sys
import tempfile
from pathlib import Path

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """nccl-tests' size notation: 8M, 1G, 4096."""
    m = re.fullmatch(r"(\d+)([KMG]?)", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 4096, 64K, 8M or 1G")
    return int(m.group(1)) * UNITS[m.group(2)]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--node-rank", type=int, required=True, help="this pod's index, 0..nodes-1 (0 reports)")
    ap.add_argument("--nodes", type=int, required=True, help="pods taking part")
    ap.add_argument("--master", required=True, help="HOST:PORT of node 0's rendezvous (node 0 listens there)")
    ap.add_argument("--gpus", type=int, default=None, help="processes on this pod (default: its CUDA devices)")
    ap.add_argument("--backend", choices=["nccl", "gloo"], default="nccl")
    ap.add_argument("--min-bytes", type=parse_size, default=parse_size("8M"))
    ap.add_argument("--max-bytes", type=parse_size, default=parse_size("1G"))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--min-busbw", type=float, default=0.0, help="fail under this mean busbw (GB/s)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every pod to join")
    ap.add_argument("--json", action="store_true", help="node 0: one JSON line with the rows and the verdict")


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.multiprocessing as mp

    if not (0 <= args.node_rank < args.nodes) or args.nodes < 1:
        print(f"error: --node-rank {args.node_rank} is not in 0..{args.nodes - 1}", file=sys.stderr)
        return 2
    if args.min_bytes > args.max_bytes:
        print(f"error: --min-bytes {args.min_bytes} is above --max-bytes {args.max_bytes}", file=sys.stderr)
        return 2
    local = args.gpus if args.gpus is not None else (torch.cuda.device_count() if args.backend == "nccl" else 1)
    if local < 1:
        print("error: no GPU on this pod (--backend nccl needs at least one; --gpus N for gloo)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        try:
            mp.spawn(_rank, args=(args, local, str(out)), nprocs=local, join=True)
        except Exception as e:  # a rank failed: it printed its error; the pod's verdict is a failure
            print(f"error: fabric check failed: {e}", file=sys.stderr)
            return 2
        if args.node_rank != 0:
            print(f"node {args.node_rank}: {local} rank(s) took part")
            return 0
        rows = json.loads(out.read_text())
    return report(rows, args, local)


def report(rows: list[dict], args: argparse.Namespace, local: int) -> int:
    avg = statistics.fmean(r["busbw_gbs"] for r in rows)
    wrong = sum(r["wrong"] for r in rows)
    ok = avg >= args.min_busbw and wrong == 0
    if args.json:
        print(json.dumps({"rows": rows, "avg_busbw_gbs": avg, "wrong": wrong, "ok": ok}))
        return 0 if ok else 1
    print(f"#  dgserve fabric-check: {args.nodes} pod(s) x {local} rank(s), {args.backend}, "
          f"{args.nodes * local} ranks in all")
    print(f"# {'size':>12} {'time_us':>10} {'algbw':>8} {'busbw':>8} {'#wrong':>7}")
    for r in rows:
        print(f"  {r['bytes']:>12} {r['time_us']:>10.1f} {r['algbw_gbs']:>8.2f} {r['busbw_gbs']:>8.2f} "
              f"{r['wrong']:>7}")
    print(f"# Out of bounds values : {wrong} {'OK' if wrong == 0 else 'FAILED'}")
    print(f"# Avg bus bandwidth    : {avg:.2f}")
    return 0 if ok else 1


def _rank(local_rank: int, args: argparse.Namespace, local: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from .selftest import sizes, sweep

    torch.set_num_threads(1)
    rank, world = args.node_rank * local + local_rank, args.nodes * local
    device = None
    if args.backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = datetime.timedelta(seconds=args.timeout)
    host, port = args.master.rsplit(":", 1)
    host = host.strip("[]")
    if rank == 0:  # the store listens on the master address only (torch's TCPStore would bind every interface)
        sock = socket.create_server((host, int(port)), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    backlog=128)
        store = dist.TCPStore(host, int(port), world, is_master=True, timeout=timeout,
                              master_listen_fd=sock.detach())
    else:
        store = dist.TCPStore(host, int(port), world, is_master=False, timeout=timeout)
    dist.init_process_group(args.backend, store=store, rank=rank, world_size=world, timeout=timeout)
    try:
        rows = sweep(sizes(args.min_bytes, args.max_bytes, world), iters=args.iters, warmup=args.warmup,
                     device=device)
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()
