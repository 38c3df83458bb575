"""One MoE layer co-located against the same layer split over E = 2 and 4 expert ranks (CPU, gloo, float32).

The layer: --experts routed experts of width --expert-width over hidden size --hidden, top --top-k, random
weights (seeded) and --rows random rows routed by a random router, in --items work items (a batch of canvases).
Co-located: `LocalExperts` holding every expert in one process. Split: 1 attention rank (`AllToAllExperts`) and E
expert ranks (`ExpertServer`), one process each (torch.multiprocessing, spawn, gloo over loopback): dispatch,
expert GEMMs, combine. Both sides run in processes with 1 torch thread each, and the split's outputs must equal
the co-located ones bitwise (the same work; exit 1 otherwise). Per side: the median of --iters calls after
--warmup; the split's time includes the exchange (all ranks share this machine's cores, which 1 + E processes
oversubscribe on a small machine: read the ratio as an upper bound on the exchange's cost here).

    python benchmarks/moe_layer.py --quick
    python benchmarks/moe_layer.py --json --rows 4096
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

QUICK = {"rows": 512, "iters": 5, "warmup": 2}
FULL = {"rows": 2048, "iters": 20, "warmup": 3}
SPLITS = (2, 4)


def layer_inputs(args):
    """(expert weights [one layer], rows, ids, weights, layout), the same in every process (seeded)."""
    import torch

    from dgserve.model.layers import RowLayout
    from dgserve.model.moe import ExpertWeights

    g = torch.Generator().manual_seed(args.seed)
    w = ExpertWeights(torch.randn(args.experts, 2 * args.expert_width, args.hidden, generator=g) / args.hidden ** .5,
                      torch.randn(args.experts, args.hidden, args.expert_width, generator=g) / args.expert_width ** .5)
    rows = torch.randn(args.rows, args.hidden, generator=g)
    ids = torch.rand(args.rows, args.experts, generator=g).topk(args.top_k, dim=-1).indices
    weights = torch.rand(args.rows, args.top_k, generator=g)
    step = args.rows // args.items
    bounds = tuple([i * step for i in range(args.items)] + [args.rows])
    return w, rows, ids, weights, RowLayout(bounds) if args.items > 1 else None


def timed(fn, iters: int, warmup: int) -> tuple[float, object]:
    out = None
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        out = fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _rank_main(rank: int, world: int, args, store: str, results) -> None:
    import torch

    from dgserve.cluster.experts.exchange import AllToAllExperts, ExpertServer, Roles
    from dgserve.cluster.experts.local import process_group
    from dgserve.cluster.experts.partition import ExpertPartition
    from dgserve.model.moe import ExpertWeights

    with process_group(rank, world, store):
        w, rows, ids, weights, layout = layer_inputs(args)
        roles = Roles(1, world - 1)
        part = ExpertPartition.balanced(args.experts, roles.experts)
        if rank == 0:
            split = AllToAllExperts(part, roles)
            seconds, got = timed(lambda: split(0, rows, ids, weights, layout), args.iters, args.warmup)
            exchange_s, _ = split.take_stats()
            # numpy pickles by value: a tensor would travel as shared memory, which this process leaves at once
            results.put({"seconds": seconds, "output": got.numpy(),
                         "exchange_s": exchange_s / (args.iters + args.warmup)})
        else:
            mine = list(part.experts_of(rank - 1))
            server = ExpertServer([ExpertWeights(w.gate_up[mine].clone(), w.down[mine].clone())], roles)
            for _ in range(args.iters + args.warmup):
                server.serve_layer(0, args.hidden, torch.float32)


def co_located(args, results) -> None:
    import torch

    from dgserve.model.moe import LocalExperts

    torch.set_num_threads(1)
    w, rows, ids, weights, layout = layer_inputs(args)
    experts = LocalExperts([w])
    seconds, out = timed(lambda: experts(0, rows, ids, weights, layout), args.iters, args.warmup)
    results.put({"seconds": seconds, "output": out.numpy()})


def run(target, procs_args: list[tuple]) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    procs = [ctx.Process(target=target, args=(*a, results)) for a in procs_args]
    for p in procs:
        p.start()
    out = results.get()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"a process failed: exit codes {[p.exitcode for p in procs]}")
    return out


def add_layer_flags(p: argparse.ArgumentParser) -> None:
    """The layer and workload flags (shared with benchmarks/topology.py); `quick_defaults` fills the workload."""
    p.add_argument("--quick", action="store_true", help=f"{QUICK['rows']} rows, {QUICK['iters']} timed calls")
    for k in QUICK:
        p.add_argument(f"--{k}", type=int, help=f"default {FULL[k]} (quick {QUICK[k]})")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--expert-width", type=int, default=256)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--items", type=int, default=8, help="work items the rows belong to (canvases in a batch)")
    p.add_argument("--seed", type=int, default=0)


def quick_defaults(args: argparse.Namespace) -> None:
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    args = p.parse_args(argv)
    quick_defaults(args)
    if not (1 <= args.top_k <= args.experts and max(SPLITS) <= args.experts and 1 <= args.items <= args.rows):
        p.error("need 1 <= --top-k <= --experts, --experts >= 4 and 1 <= --items <= --rows")
    return args


def main(argv: Sequence[str] | None = None) -> int:

    args = parse(argv)
    watch = common.LoadWatch()
    base = run(co_located, [(args,)])
    sides = {"co-located": {"seconds": base["seconds"], "equal": True, "processes": 1}}
    for e in SPLITS:
        with tempfile.TemporaryDirectory(prefix="dgserve-moe-") as tmp:
            store = os.path.join(tmp, "store")
            res = run(_rank_main, [(r, 1 + e, args, store) for r in range(1 + e)])
        sides[f"E={e}"] = {"seconds": res["seconds"], "equal": bool((res["output"] == base["output"]).all()),
                           "exchange_s": res["exchange_s"], "processes": 1 + e}
    load = watch.finish(own=1 + max(SPLITS))
    head = ("side", "processes", "ms per layer", "x co-located", "exchange ms", "same output")
    cells = [head] + [(name, str(s["processes"]), f"{s['seconds'] * 1e3:.2f}",
                       f"{s['seconds'] / base['seconds']:.2f}",
                       f"{s['exchange_s'] * 1e3:.2f}" if "exchange_s" in s else "-", str(s["equal"]))
                      for name, s in sides.items()]
    print(f"one MoE layer: {args.rows} rows in {args.items} items, {args.experts} experts top-{args.top_k}, hidden "
          f"{args.hidden}, width {args.expert_width}, float32; every process 1 torch thread on {os.cpu_count()} cpus")
    for line in common.table(cells) + common.load_lines(load):
        print(line)
    same = all(s["equal"] for s in sides.values())
    if args.json:
        print(json.dumps({"sides": sides, "same_output": same, "config": {k: getattr(args, k) for k in (
            "rows", "iters", "warmup", "hidden", "experts", "expert_width", "top_k", "items", "seed")},
            "load": load, "contended": load["contended"]}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
