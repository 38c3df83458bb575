"""The all-to-all sweep a unit runs when it starts, and that benchmarks/all_to_all.py runs over its sizes.

Every rank of the group calls `sweep` with the same sizes. Per size (the bytes one rank sends in all, as
nccl-tests counts it): `warmup` untimed calls, then `iters` timed `all_to_all_single` calls with equal splits.
A call's time is the slowest rank's; rank 0 gets the median, algbw = size / time, busbw = algbw x (n - 1) / n,
and `wrong`: received elements that differ from the pattern their sender wrote.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

ELEMENT = 4  # float32
STARTUP_SIZES = (64 << 10, 1 << 20, 4 << 20)  # what a unit measures when it starts (a fraction of a second)


def sizes(lo: int, hi: int, ranks: int) -> list[int]:
    """Doubling sizes from lo to hi, each rounded down to whole elements per peer (at least one)."""
    out, s = [], lo
    while s <= hi:
        per_peer = max(1, s // (ELEMENT * ranks))
        out.append(per_peer * ELEMENT * ranks)
        s *= 2
    return sorted(set(out))


def bandwidths(size: int, seconds: float, ranks: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s."""
    alg = size / seconds / 1e9
    return alg, alg * (ranks - 1) / ranks


def sweep(sizes: list[int], iters: int = 3, warmup: int = 1, group=None,
          device: torch.device | None = None) -> list[dict]:
    """Rank 0: one row per size {bytes, count, time_us, algbw_gbs, busbw_gbs, wrong}; other ranks: []."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device = device or torch.device("cpu")
    rows = []
    for size in sizes:
        n = max(1, size // (ELEMENT * world))  # elements to each peer
        # float32 from the start (no int64 temporaries: at 1 GiB a rank, memory the GPUs' units may need)
        peers = torch.arange(world, device=device, dtype=torch.float32)
        send = (peers + 1000 * rank).repeat_interleave(n)
        recv = torch.empty_like(send)
        times = []
        for i in range(warmup + iters):
            dist.barrier(group=group)
            t0 = time.perf_counter()
            dist.all_to_all_single(recv, send, group=group)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        wrong = int((recv != (peers * 1000 + rank).repeat_interleave(n)).sum())
        del send, recv
        if device.type == "cuda":
            torch.cuda.empty_cache()
        everyone = [None] * world if rank == 0 else None
        dist.gather_object((times, wrong), everyone, dst=0, group=group)
        if rank == 0:
            seconds = statistics.median(max(t[i] for t, _ in everyone) for i in range(iters))
            alg, bus = bandwidths(n * ELEMENT * world, seconds, world)
            rows.append({"bytes": n * ELEMENT * world, "count": n * world, "time_us": seconds * 1e6,
                         "algbw_gbs": alg, "busbw_gbs": bus, "wrong": sum(w for _, w in everyone)})
    return rows
