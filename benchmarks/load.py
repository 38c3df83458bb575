"""Overload and chaos: the real server (`dgserve serve`) at twice its throughput, and while its processes are
SIGKILLed.

One run starts `dgserve serve` as a subprocess (its own local Ray cluster and --temp-dir, a free loopback port, the
embedded tiny model) with the topology TOPOLOGY (1 unit, 2 attention ranks, engine max_running 4 and max_queued 8,
watchdog 5 s, Serve health checks every 1 s with a 5 s timeout; --attention-ranks, --max-running, --max-queued
change it). Every request is one Generate of --prompt-len random ids in 4..900, --max-new-tokens and
--max-denoising-steps (seeded: --seed). The clients are `dgserve_client.aio.AsyncClient`s on one asyncio loop in
this process. Phases:

    capacity     units x attention ranks x max_running: the requests the server denoises at once
    calibration  a closed loop of `capacity` clients for calibrate_s: throughput X (completed req/s), p50 latency
    overload     open-loop Poisson arrivals (seeded) at 2X for load_s; no client retries (retries=0), so the
                 server's own answer is seen; each request has a deadline of deadline_s
    chaos        open-loop Poisson arrivals at 0.5X with the SDK's default retries (deadline 60 s) while the
                 script SIGKILLs, in turn, (a) a rank actor, (b) the engine unit's Serve replica, (c) the gateway's
                 Serve replica, with the server serving again in between. Half the throughput: this phase measures
                 recovery, and at 1X the backlog built during an outage never drains, so probes wait behind it

Each request ends one way: completed, refused (RESOURCE_EXHAUSTED), failed (any other final error; counted per
gRPC code), or not at all: lost = sent - completed - refused - failed, the requests still running at the end of
their phase plus their deadline and a grace period (they are then cancelled). Every phase must lose none.
Per phase: goodput (completed req/s and tokens/s over the phase's wall time, its start to its last end), p50/p99
latency of completed requests, p50 time to refusal (refusals should be fast), and the pushback hints
(`grpc-retry-pushback-ms`, RESOURCE_EXHAUSTED's trailing metadata; the SDK's `retry_after_s`): the values seen and
on how many refusals.

Kill targets are found among the serve subprocess's descendants (walking PPid in /proc) by Ray's process titles:
`ray::RankActor`, `ray::ServeReplica:<app>:EngineUnit`, `ray::ServeReplica:<app>:Gateway` (the newest when
several). Rank 0 serves its group's TCP store, so its process has a `pt_tcpstore_uv` thread: (a) kills a rank
without one (a non-zero rank), or says it could not tell. From each kill on, the gateway's gRPC health
(grpc.health.v1, service "") is read every 0.1 s on its own channel (reconnecting within 0.5 s), and a probe (a
fresh channel, retries=0, a 5 s timeout, 32 new tokens, 1 denoising step) starts every 0.2 s (at most 10 at once)
until one succeeds. Per kill:

    not_serving_after_s  from the kill to the first health read NOT_SERVING (for the gateway kill a health call
                         failing with UNAVAILABLE, the gateway being down, counts too); null when health never read
                         so within the window (the kill until serving again, at least 10 s)
    serving_again_s      from the kill until both health reads SERVING again (after having been not serving; at
                         once when it never went down) and a probe has succeeded since the kill (goal 15 s, limit
                         120 s)

3 s of normal load follow; then the load's own view of the kill: the longest stretch since the kill without a
completed request (no_completions_s) and when completions resumed after it (completions_resumed_s). The next kill
follows unless neither the server was serving again nor completions resumed; after the last, arrivals stop and
every request is waited for (its deadline bounds the wait).

Exit status 1 when a phase lost a request, a kill target was not found, or the server was not serving again
within 120 s of a kill. The server is always stopped (SIGINT, then SIGKILL of its process group after 90 s) and any
process left with this run's Ray temp folder in its command line is killed and reported (--keep-logs DIR first
copies the serve output and Ray's session logs there). Each phase's first error text per failure code is printed.
--repeats is not used (one run), nor is --bench-dir (the embedded tiny model); --threads sets the ranks' torch
threads (engine cpu_threads).

    python benchmarks/load.py --quick
    python benchmarks/load.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.serve_process import KILL_TARGETS, Server, ServerError, kill_target  # noqa: E402

QUICK = {"prompt_len": 16, "max_new_tokens": 64, "max_denoising_steps": 4, "repeats": 1,
         "calibrate_s": 8.0, "load_s": 15.0, "deadline_s": 20.0}
FULL = {"prompt_len": 16, "max_new_tokens": 64, "max_denoising_steps": 8, "repeats": 1,
        "calibrate_s": 30.0, "load_s": 60.0, "deadline_s": 30.0}
TOPOLOGY = {"units": {"min": 1, "max": 1}, "attention_ranks": 2, "engine": {"max_running": 4, "max_queued": 8},
            "watchdog_s": 5, "serve": {"health_check_period_s": 1.0, "health_check_timeout_s": 5.0}}

OVERLOAD_FACTOR = 2.0  # overload arrivals: this times the calibrated throughput
CHAOS_FACTOR = 0.5  # chaos arrivals: this times the calibrated throughput (at 1X an outage's backlog never drains)
CHAOS_DEADLINE_S = 60.0
GRACE_S = 10.0  # past a phase's end and its requests' deadline: a request still running is lost
PROMPT_IDS = (4, 900)  # random prompt ids are drawn from this range (inclusive)
RECOVERY_GOAL_S = 15.0
RECOVERY_LIMIT_S = 120.0
SETTLE_S = 3.0  # normal load before the first kill and after each recovery
PROBE = {"period_s": 0.2, "timeout_s": 5.0, "in_flight": 10, "max_new_tokens": 32, "max_denoising_steps": 1}
PROBE_IDS = (2, 10, 11, 12)
HEALTH = {"period_s": 0.1, "timeout_s": 1.0}  # the health reads after a kill (service "": the whole server)
HEALTH_WATCH_S = 10.0  # health is watched this long at least for NOT_SERVING (watchdog 5 s + probe period 1 s)
START_TIMEOUT_S = 300.0


# ----------------------------------------------------------------------------------------------- accounting


@dataclass(frozen=True)
class Outcome:
    """How one request ended."""

    kind: str  # completed | refused | failed
    code: str | None  # the final error's gRPC code name (None when completed)
    latency_s: float  # from the call to its end (for a refusal: the time to refusal)
    tokens: int = 0
    pushback_ms: float | None = None
    end: float = 0.0  # time.perf_counter() at the end
    message: str = ""  # the final error's text (empty when completed)


def classify(error: BaseException | None) -> tuple[str, str | None]:
    """(kind, code) of a request that ended with `error` (None: it completed). RESOURCE_EXHAUSTED is a refusal;
    any other error a failure, named by its gRPC code (the exception's type when it has none)."""
    if error is None:
        return "completed", None
    name = getattr(getattr(error, "code", None), "name", None) or type(error).__name__
    return ("refused" if name == "RESOURCE_EXHAUSTED" else "failed"), name


def _metadata_value(metadata, key: str) -> str | None:
    """The first value of `key` in gRPC metadata (pairs, a mapping, or a callable returning either)."""
    if callable(metadata):
        metadata = metadata()
    if metadata is None:
        return None
    pairs = metadata.items() if isinstance(metadata, Mapping) else metadata
    for k, v in pairs:
        if k == key:
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


def pushback_ms(error: BaseException) -> float | None:
    """The server's retry pushback (ms) carried by a client error: the SDK's `retry_after_s` (seconds), or another
    attribute it may expose (`retry_pushback_ms`, `pushback_ms`, `trailing_metadata`), else the trailing metadata
    of the gRPC error the SDK's typed error was raised from (`__context__`). None when there is none."""
    if (after_s := getattr(error, "retry_after_s", None)) is not None:
        return 1000 * float(after_s)
    for attr in ("retry_pushback_ms", "pushback_ms"):
        value = getattr(error, attr, None)
        if value is not None:
            return float(value)
    for source in (error, error.__context__):
        with contextlib.suppress(Exception):  # a grpc error without trailing metadata, or a malformed value
            value = _metadata_value(getattr(source, "trailing_metadata", None), "grpc-retry-pushback-ms")
            if value is not None:
                return float(value)
    return None


def outcome_of(error: BaseException | None, latency_s: float, tokens: int = 0, end: float = 0.0) -> Outcome:
    kind, code = classify(error)
    hint = pushback_ms(error) if kind == "refused" and error is not None else None
    return Outcome(kind, code, latency_s, tokens, hint, end, "" if error is None else str(error)[:300])


def lost_count(sent: int, completed: int, refused: int, failed: int) -> int:
    """Requests sent that never ended."""
    if min(sent, completed, refused, failed) < 0 or completed + refused + failed > sent:
        raise ValueError(f"inconsistent counts: sent {sent}, ended {completed} + {refused} + {failed}")
    return sent - completed - refused - failed


def _ms(values: Sequence[float], q: float) -> float | None:
    return None if not values else 1000 * common.percentile(values, q)


def summarize(sent: int, outcomes: Sequence[Outcome], wall_s: float) -> dict:
    """One phase: counts, lost, failures by code, goodput over `wall_s`, latency of completed requests, time to
    refusal, pushback hints."""
    by_kind: dict[str, list[Outcome]] = {"completed": [], "refused": [], "failed": []}
    for o in outcomes:
        by_kind[o.kind].append(o)
    done, refused, failed = by_kind["completed"], by_kind["refused"], by_kind["failed"]
    latencies = [o.latency_s for o in done]
    hints = [o.pushback_ms for o in refused if o.pushback_ms is not None]
    codes = {o.code for o in failed}
    wall = max(wall_s, 1e-9)
    return {"sent": sent, "completed": len(done), "refused": len(refused), "failed": len(failed),
            "lost": lost_count(sent, len(done), len(refused), len(failed)),
            "failed_by_code": dict(sorted(Counter(o.code for o in failed).items())),
            "failed_example": {c: next(o.message for o in failed if o.code == c) for c in sorted(codes)},
            "wall_s": round(wall_s, 3), "goodput_rps": len(done) / wall,
            "goodput_tokens_per_s": sum(o.tokens for o in done) / wall,
            "latency_ms_p50": _ms(latencies, 0.5), "latency_ms_p99": _ms(latencies, 0.99),
            "refusal_ms_p50": _ms([o.latency_s for o in refused], 0.5),
            "pushback_hints": len(hints), "pushback_ms_p50": None if not hints else common.percentile(hints, 0.5),
            "pushback_ms_seen": {f"{v:g}": n for v, n in sorted(Counter(hints).items())}}


def pushback_line(p: Mapping) -> str:
    """The pushback hints a phase's refusals carried: "grpc-retry-pushback-ms: 1000 ms on 115 of 115 refusals"."""
    seen = p.get("pushback_ms_seen") or {}
    if not seen:
        return f"grpc-retry-pushback-ms: none on {p['refused']} refusals"
    values = ", ".join(f"{v} ms on {n}" for v, n in seen.items())
    return f"grpc-retry-pushback-ms: {values} of {p['refused']} refusals"


COUNTS = ("sent", "completed", "refused", "failed", "lost")


def totals(phases: Mapping[str, Mapping]) -> dict:
    """sent / completed / refused / failed / lost summed over the phases."""
    return {k: sum(p[k] for p in phases.values()) for k in COUNTS}


def arrivals(rate: float, rng: random.Random) -> Iterator[float]:
    """Poisson arrival times (s from the start) at `rate` per second, without end."""
    if rate <= 0:
        raise ValueError(f"an arrival rate is > 0, not {rate}")
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        yield t


def arrival_times(rate: float, seconds: float, rng: random.Random) -> list[float]:
    return list(itertools.takewhile(lambda t: t < seconds, arrivals(rate, rng)))


def completion_gap(ends: Iterable[float], since: float, until: float) -> tuple[float, float | None]:
    """The longest stretch of [since, until] without a completed request (`ends`: completion times), and when
    completions resumed after it (seconds from `since`; None when the stretch runs to `until`)."""
    best, resumed, prev = 0.0, None, since
    for t in sorted(t for t in ends if since <= t <= until):
        if t - prev > best:
            best, resumed = t - prev, t - since
        prev = t
    if until - prev > best:
        best, resumed = until - prev, None
    return best, resumed


def health_state(read: str, gateway: bool) -> str:
    """up | down | unknown: one health read (SERVING, NOT_SERVING, ... or the failed call's gRPC code). For the
    gateway kill a call failing with UNAVAILABLE (nothing listens) is down too."""
    if read == "SERVING":
        return "up"
    if read == "NOT_SERVING" or (gateway and read == "UNAVAILABLE"):
        return "down"
    return "unknown"


def recovery(reads: Sequence[tuple[float, str]], probe_ok: float | None, watched_s: float, gateway: bool,
             min_watch_s: float = HEALTH_WATCH_S) -> tuple[float | None, float | None]:
    """(not_serving_after_s, serving_again_s) of a kill, from its health reads ((seconds since the kill, read), in
    order) and its first successful probe's end (seconds since the kill; None: none yet), `watched_s` after it.
    not_serving_after_s: the first read that was down (None: none). serving_again_s: when both health read up again
    after that (at once, 0, when none was down, once health was watched `min_watch_s`) and a probe had succeeded;
    None while either is not so."""
    down = next((t for t, r in reads if health_state(r, gateway) == "down"), None)
    if down is None:
        health_ok = 0.0 if watched_s >= min_watch_s else None
    else:
        health_ok = next((t for t, r in reads if t > down and health_state(r, gateway) == "up"), None)
    if health_ok is None or probe_ok is None:
        return down, None
    return down, max(health_ok, probe_ok)


def capacity_of(topology: Mapping) -> int:
    """Requests denoised at once: units x attention ranks x max_running."""
    units = topology.get("units", {}).get("min", 1)
    return units * topology.get("attention_ranks", 1) * topology["engine"]["max_running"]


# ----------------------------------------------------------------------------------------------- load


@dataclass
class Phase:
    """What one phase sent and how each request ended; its tasks are the requests still running."""

    sent: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    tasks: set[asyncio.Task] = field(default_factory=set)
    started: float = field(default_factory=time.perf_counter)
    last_end: float = 0.0

    def summary(self, arrivals_s: float = 0.0) -> dict:
        wall = max(arrivals_s, self.last_end - self.started)
        return summarize(self.sent, self.outcomes, wall)


class Workload:
    """Request i: --prompt-len random ids (seeded), seed + i, the workload's new tokens and steps."""

    def __init__(self, args: argparse.Namespace, name: str, rng: random.Random):
        self.args, self.name, self.rng, self.i = args, name, rng, 0

    def next(self) -> dict:
        self.i += 1
        ids = [self.rng.randint(*PROMPT_IDS) for _ in range(self.args.prompt_len)]
        return {"token_ids": ids, "seed": self.args.seed + self.i, "max_new_tokens": self.args.max_new_tokens,
                "max_denoising_steps": self.args.max_denoising_steps, "request_id": f"load-{self.name}-{self.i}"}


async def one_request(client, request: dict, phase: Phase) -> None:
    """Sends one request and records how it ended (a cancelled request records nothing: it is lost)."""
    phase.sent += 1
    t0 = time.perf_counter()
    try:
        r = await client.generate(**request)
    except Exception as e:
        end = time.perf_counter()
        outcome = outcome_of(e, end - t0, end=end)
    else:
        end = time.perf_counter()
        outcome = outcome_of(None, end - t0, len(r.token_ids), end)
    phase.outcomes.append(outcome)
    phase.last_end = end


def spawn(client, request: dict, phase: Phase) -> None:
    task = asyncio.get_running_loop().create_task(one_request(client, request, phase))
    phase.tasks.add(task)
    task.add_done_callback(phase.tasks.discard)


async def finish(phase: Phase, timeout: float) -> int:
    """Waits up to `timeout` for the phase's requests; cancels (loses) the rest and returns their number."""
    pending = set(phase.tasks)
    if pending:
        _, pending = await asyncio.wait(pending, timeout=timeout)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return len(pending)


async def closed_loop(client, n: int, seconds: float, work: Workload, phase: Phase, deadline_s: float) -> None:
    """`n` clients, each sending its next request when the last one ended, for `seconds`."""
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop:
            await one_request(client, work.next(), phase)

    for _ in range(n):
        phase.tasks.add(asyncio.get_running_loop().create_task(worker()))
    await finish(phase, seconds + deadline_s + GRACE_S)


async def open_loop(client, rate: float, seconds: float, work: Workload, phase: Phase, rng: random.Random,
                    stop: asyncio.Event | None = None) -> float:
    """Requests at Poisson arrival times (`rate` per second) for `seconds` or until `stop` is set; returns how long
    the arrivals ran."""
    t0 = time.perf_counter()
    for t in arrivals(rate, rng):
        if t >= seconds or (stop is not None and stop.is_set()):
            break
        await asyncio.sleep(max(0.0, t0 + t - time.perf_counter()))
        spawn(client, work.next(), phase)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- phases


def _client(address: str, **kw):
    from dgserve_client.aio import AsyncClient

    return AsyncClient(address, **kw)


async def calibrate(address: str, capacity: int, args: argparse.Namespace) -> dict:
    work = Workload(args, "calibration", random.Random(args.seed))
    async with _client(address, timeout=args.deadline_s, retries=0) as c:
        await c.info()
        warm = Phase()
        await closed_loop(c, capacity, 0.1, Workload(args, "warm-up", random.Random(-1)), warm, args.deadline_s)
        phase = Phase()
        await closed_loop(c, capacity, args.calibrate_s, work, phase, args.deadline_s)
    out = phase.summary()
    out |= {"concurrency": capacity, "throughput_rps": out["goodput_rps"]}
    return out


async def overload(address: str, rate: float, args: argparse.Namespace) -> dict:
    work, rng = Workload(args, "overload", random.Random(args.seed + 1)), random.Random(args.seed + 2)
    async with _client(address, timeout=args.deadline_s, retries=0) as c:
        await c.info()
        phase = Phase()
        ran = await open_loop(c, rate, args.load_s, work, phase, rng)
        await finish(phase, args.deadline_s + GRACE_S)
    return phase.summary(ran) | {"rate_rps": rate, "deadline_s": args.deadline_s, "retries": 0}


@functools.cache
def _fresh_client_class():
    """AsyncClient on a local subchannel pool: each probe's (and the health reads') channel connects at once,
    sharing no reconnect backoff with the load's channel or the others, and reconnects within 0.5 s (the health
    channel outlives the gateway's restart)."""
    from dgserve_client.aio import AsyncClient

    class FreshClient(AsyncClient):
        _options = AsyncClient._options + (("grpc.use_local_subchannel_pool", 1),
                                           ("grpc.initial_reconnect_backoff_ms", 100),
                                           ("grpc.min_reconnect_backoff_ms", 100),
                                           ("grpc.max_reconnect_backoff_ms", 500))

    return FreshClient


async def probe_once(address: str, i: int) -> str | None:
    """One probe on a fresh channel, no retries: None when it succeeded, else its error's code."""
    async with _fresh_client_class()(address, timeout=PROBE["timeout_s"], retries=0) as c:
        try:
            await c.generate(token_ids=PROBE_IDS, seed=i, max_new_tokens=PROBE["max_new_tokens"],
                             max_denoising_steps=PROBE["max_denoising_steps"], request_id=f"probe-{i}")
        except Exception as e:
            return classify(e)[1]
    return None


async def watch_recovery(address: str, since: float, gateway: bool, limit: float) -> dict:
    """From a kill (`since`, perf_counter) on: the health read every HEALTH period_s on its own channel, and probes
    every PROBE period_s (at most in_flight at once) until one succeeds; until `recovery` says serving again or
    `limit` passed. Returns not_serving_after_s, serving_again_s (None after `limit`), when health was up again
    (health_ok_s) and the first probe succeeded (probe_ok_s), the health reads and the probes' errors by code."""
    reads: list[tuple[float, str]] = []
    ok_at: list[float] = []
    codes: Counter[str] = Counter()
    tasks: set[asyncio.Task] = set()
    loop = asyncio.get_running_loop()

    async def health() -> None:
        async with _fresh_client_class()(address, timeout=HEALTH["timeout_s"], retries=0, check_version=False) as c:
            while True:
                t = time.perf_counter()
                try:
                    read = await c.health(timeout=HEALTH["timeout_s"])
                except Exception as e:
                    read = classify(e)[1]
                reads.append((time.perf_counter() - since, read))
                await asyncio.sleep(max(0.0, t + HEALTH["period_s"] - time.perf_counter()))

    async def probe(i: int) -> None:
        code = await probe_once(address, i)
        if code is None:
            ok_at.append(time.perf_counter() - since)
        else:
            codes[code] += 1

    watcher = loop.create_task(health())
    down, again, next_probe = None, None, 0.0
    for i in itertools.count():
        now = time.perf_counter() - since
        down, again = recovery(reads, min(ok_at) if ok_at else None, now, gateway)
        if again is not None or now > limit:
            break
        if not ok_at and now >= next_probe and len(tasks) < PROBE["in_flight"]:
            t = loop.create_task(probe(i))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            next_probe = now + PROBE["period_s"]
        await asyncio.sleep(HEALTH["period_s"] / 2)
    for t in (*tasks, watcher):
        t.cancel()
    await asyncio.gather(*tasks, watcher, return_exceptions=True)
    health_ok = next((t for t, r in reads if (down is None or t > down) and r == "SERVING"), None)

    def r3(v: float | None) -> float | None:
        return None if v is None else round(v, 3)

    return {"not_serving_after_s": r3(down), "serving_again_s": r3(again), "health_ok_s": r3(health_ok),
            "probe_ok_s": r3(min(ok_at) if ok_at else None),
            "health_reads": dict(sorted(Counter(r for _, r in reads).items())),
            "probe_errors": dict(sorted(codes.items()))}


async def kill_one(server: Server, target: str, phase: Phase) -> dict:
    """SIGKILLs the target's process, measures when the gateway's health went NOT_SERVING and when the server was
    serving again (`watch_recovery`), waits SETTLE_S more, then measures the load's longest stretch without a
    completion since the kill (`no_completions_s`; completions resumed `completions_resumed_s` after the kill, None
    when they did not)."""
    procs = server.processes()
    proc, what = kill_target(procs, target)
    out = {"target": target, "pid": None, "what": what, "title": None, "not_serving_after_s": None,
           "serving_again_s": None, "health_ok_s": None, "probe_ok_s": None, "health_reads": {}, "probe_errors": {},
           "no_completions_s": None, "completions_resumed_s": None}
    if proc is None:
        return out
    out |= {"pid": proc.pid, "title": proc.cmdline[:60]}
    os.kill(proc.pid, signal.SIGKILL)
    since = time.perf_counter()
    out |= await watch_recovery(server.address, since, target == "gateway", RECOVERY_LIMIT_S)
    await asyncio.sleep(SETTLE_S)
    ends = [o.end for o in phase.outcomes if o.kind == "completed"]
    gap, resumed = completion_gap(ends, since, time.perf_counter())
    out |= {"no_completions_s": round(gap, 3), "completions_resumed_s": None if resumed is None else round(resumed, 3)}
    down = "health never read NOT_SERVING" if out["not_serving_after_s"] is None else \
        f"NOT_SERVING after {out['not_serving_after_s']:.1f} s"
    again = "not serving again" if out["serving_again_s"] is None else \
        f"serving again after {out['serving_again_s']:.1f} s"
    print(f"chaos: SIGKILL {target} pid {proc.pid} ({what}): {down}, {again}; the load's completions "
          + ("did not resume" if resumed is None else f"resumed after {resumed:.1f} s"), flush=True)
    return out


async def chaos(server: Server, rate: float, args: argparse.Namespace) -> dict:
    work, rng = Workload(args, "chaos", random.Random(args.seed + 3)), random.Random(args.seed + 4)
    async with _client(server.address, timeout=CHAOS_DEADLINE_S) as c:  # the SDK's default retries
        await c.info()
        phase, stop = Phase(), asyncio.Event()
        feeder = asyncio.get_running_loop().create_task(open_loop(c, rate, math.inf, work, phase, rng, stop))
        await asyncio.sleep(SETTLE_S)
        kills = []
        for target in KILL_TARGETS:  # on to the next kill while the server completes requests
            k = await kill_one(server, target, phase)
            kills.append(k)
            if k["pid"] is not None and k["serving_again_s"] is None and k["completions_resumed_s"] is None:
                break
        stop.set()
        ran = await feeder
        await finish(phase, CHAOS_DEADLINE_S + GRACE_S)
    return phase.summary(ran) | {"rate_rps": rate, "deadline_s": CHAOS_DEADLINE_S, "retries": "SDK default",
                                 "kills": kills}


async def run_phases(server: Server, capacity: int, args: argparse.Namespace) -> dict:
    cal = await calibrate(server.address, capacity, args)
    x = cal["throughput_rps"]
    print(f"calibration: {x:.2f} req/s at {capacity} concurrent clients, p50 {cal['latency_ms_p50'] or 0:.0f} ms",
          flush=True)
    if cal["completed"] == 0:
        raise ServerError("calibration completed no request; nothing to load the server with")
    over = await overload(server.address, OVERLOAD_FACTOR * x, args)
    print(f"overload: {over['completed']} of {over['sent']} completed, {over['refused']} refused, "
          f"{over['failed']} failed", flush=True)
    return {"calibration": cal, "overload": over, "chaos": await chaos(server, CHAOS_FACTOR * x, args)}


# ----------------------------------------------------------------------------------------------- report


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def phase_rows(phases: Mapping[str, Mapping]) -> list[tuple[str, ...]]:
    rows = [("phase", "rate req/s", "sent", "completed", "refused", "failed", "lost", "goodput req/s", "tok/s",
             "p50 ms", "p99 ms", "refusal p50 ms", "failed by code")]
    for name, p in phases.items():
        rate = p.get("rate_rps")
        rows.append((name, "closed" if rate is None else f"{rate:.2f}", *(str(p[k]) for k in COUNTS[:5]),
                     f"{p['goodput_rps']:.2f}", f"{p['goodput_tokens_per_s']:.0f}", _f(p["latency_ms_p50"], 0),
                     _f(p["latency_ms_p99"], 0), _f(p["refusal_ms_p50"], 0),
                     ",".join(f"{k}:{v}" for k, v in p["failed_by_code"].items()) or "-"))
    return rows


def kill_rows(kills: Sequence[Mapping]) -> list[tuple[str, ...]]:
    rows = [("kill", "pid", "process", "not_serving_after_s", "serving_again_s", "goal", "health up s",
             "probe ok s", "probe errors", "no_completions_s", "completions_resumed_s")]
    for k in kills:
        s = k["serving_again_s"]
        verdict = "NOT BACK" if s is None else ("met" if s <= RECOVERY_GOAL_S else "missed")
        rows.append((k["target"], str(k["pid"] or "-"), k["what"], _f(k["not_serving_after_s"]), _f(s),
                     f"{RECOVERY_GOAL_S:.0f} s ({verdict})", _f(k.get("health_ok_s")), _f(k.get("probe_ok_s")),
                     ",".join(f"{c}:{n}" for c, n in k["probe_errors"].items()) or "-", _f(k["no_completions_s"]),
                     _f(k["completions_resumed_s"])))
    return rows


def failures(result: Mapping) -> list[str]:
    """Why the run failed ([] when it did not)."""
    out = [f"{name}: {p['lost']} request(s) lost" for name, p in result["phases"].items() if p["lost"]]
    for k in result["phases"].get("chaos", {}).get("kills", []):
        if k["pid"] is None:
            out.append(f"chaos: {k['target']}: {k['what']}")
        elif k["serving_again_s"] is None:
            out.append(f"chaos: {k['target']} (pid {k['pid']}) not serving again within {RECOVERY_LIMIT_S:.0f} s")
    if "chaos" in result["phases"] and len(result["phases"]["chaos"]["kills"]) < len(KILL_TARGETS):
        out.append("chaos: not every kill was done")
    return out


def as_json(result: Mapping) -> dict:
    """The --json object: config, capacity, each phase, the totals, threads, the server's stop, load."""
    phases = result["phases"]
    return {"config": result["config"], "capacity": result["capacity"], **phases, **totals(phases),
            "threads": result["threads"], "server": result["server"], "load": result["load"],
            "contended": result["load"]["contended"], "wall_s": result["wall_s"], "ok": not failures(result)}


def report_lines(result: Mapping) -> list[str]:
    cfg, phases = result["config"], result["phases"]
    topo = cfg["topology"]
    lines = [f"load benchmark: dgserve serve (embedded tiny model, loopback), {topo['units']['min']} unit x "
             f"{topo['attention_ranks']} attention ranks x max_running {topo['engine']['max_running']} = capacity "
             f"{result['capacity']}; max_queued {topo['engine']['max_queued']}, watchdog {topo['watchdog_s']} s, "
             f"health checks every {topo['serve']['health_check_period_s']} s; requests: {cfg['prompt_len']} random "
             f"ids, {cfg['max_new_tokens']} new tokens, {cfg['max_denoising_steps']} steps"]
    lines += common.table(phase_rows(phases))
    for name, p in phases.items():
        for code, message in p.get("failed_example", {}).items():
            lines.append(f"{name}: first {code}: {message[:200]}")
    over = phases.get("overload")
    if over is not None:
        lines.append(f"overload (arrivals at {OVERLOAD_FACTOR:g}x calibrated throughput, retries 0, deadline "
                     f"{over['deadline_s']:g} s): {pushback_line(over)}")
    chaos_ = phases.get("chaos")
    if chaos_ is not None:
        lines.append(f"chaos (arrivals at {CHAOS_FACTOR:g}x calibrated throughput, SDK default retries, deadline "
                     f"{CHAOS_DEADLINE_S:g} s): final errors "
                     + (", ".join(f"{k} {v}" for k, v in chaos_["failed_by_code"].items()) or "none"))
        lines += common.table(kill_rows(chaos_["kills"]))
    lines.append(f"threads: {result['threads']['line']}")
    s = result["server"]
    lines.append(f"server stop: rc {s['rc']}{' after SIGKILL of its process group' if s['forced'] else ' (SIGINT)'}"
                 f", leftover processes killed: {s['leftovers_killed'] or 'none'}; wall {result['wall_s']:.0f} s")
    lines += [f"FAILED: {f}" for f in failures(result)]
    return lines + common.load_lines(result["load"])


def threads_info(topology: Mapping) -> dict:
    ranks, torch_threads = topology["attention_ranks"], topology["engine"]["cpu_threads"]
    line = (f"the server's {ranks} ranks run {torch_threads} torch thread(s) each (engine cpu_threads) plus the "
            f"engine's default noise worker; the unit and gateway replicas relay; Ray's raylet, GCS and core workers "
            f"besides; the clients (every phase and the probes) run on one asyncio loop in this process")
    return {"line": line, "rank_torch_threads": torch_threads, "ranks": ranks, "client": "this process, 1 loop",
            "own": ranks * (torch_threads + 1) + 2}


# ----------------------------------------------------------------------------------------------- main


def add_flags(p: argparse.ArgumentParser) -> None:
    for k, what in (("calibrate_s", "calibration seconds"), ("load_s", "overload arrival seconds"),
                    ("deadline_s", "each calibration and overload request's deadline (s)")):
        p.add_argument(f"--{k.replace('_', '-')}", type=float,
                       help=f"{what} (default {FULL[k]:g}; quick {QUICK[k]:g})")
    for k in ("attention_ranks", "max_running", "max_queued"):
        default = TOPOLOGY[k] if k == "attention_ranks" else TOPOLOGY["engine"][k]
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=default, help=f"topology (default {default})")
    p.add_argument("--keep-logs", type=Path, help="copy the serve output (serve.log) and Ray's session logs "
                   "(ray-logs/) into this folder when the server stops")


def make_topology(args: argparse.Namespace) -> dict:
    engine = {**TOPOLOGY["engine"], "max_running": args.max_running, "max_queued": args.max_queued,
              "cpu_threads": args.threads}
    return {**TOPOLOGY, "attention_ranks": args.attention_ranks, "engine": engine}


def main(argv: Sequence[str] | None = None) -> int:
    args = common.parse_args(__doc__, QUICK, FULL, argv, add_flags)
    load, t0 = common.LoadWatch(), time.perf_counter()
    topology = make_topology(args)
    capacity = capacity_of(topology)
    config = {"topology": topology, "seed": args.seed, "quick": args.quick,
              **{k: getattr(args, k) for k in QUICK if k != "repeats"}, "overload_factor": OVERLOAD_FACTOR,
              "chaos_factor": CHAOS_FACTOR,
              "chaos_deadline_s": CHAOS_DEADLINE_S, "grace_s": GRACE_S, "recovery_goal_s": RECOVERY_GOAL_S}
    print(f"capacity: {capacity} concurrent requests (units x attention ranks x max_running)", flush=True)
    phases: dict = {}
    with tempfile.TemporaryDirectory(prefix="dgserve-load-") as work:
        server = Server(topology, Path(work), args.keep_logs)
        try:
            print(server.start(START_TIMEOUT_S), flush=True)
            print("server processes (descendants of dgserve serve):")
            print("\n".join(f"  {p.pid:>7} {p.cmdline[:100]}" for p in server.processes()), flush=True)
            phases = asyncio.run(run_phases(server, capacity, args))
        except ServerError as e:
            print(f"error: {e}", file=sys.stderr)
        finally:
            stopped = server.stop()
    threads = threads_info(topology)
    result = {"config": config, "capacity": capacity, "phases": phases, "threads": threads, "server": stopped,
              "wall_s": time.perf_counter() - t0, "load": load.finish(own=threads["own"])}
    print("\n".join(report_lines(result)))
    if args.json:
        print(json.dumps(as_json(result)))
    return 1 if failures(result) or not phases else 0


if __name__ == "__main__":
    sys.exit(main())
