"""The gateway's event loop under hostile text: grpc.health.v1 latency while clients send huge text prompts.

Before the security work a 10 MB text prompt was tokenized on the gateway's event loop for 12-20 s and every RPC,
health included, waited. Now a message larger than the largest valid request is dropped by gRPC before it is
read (RESOURCE_EXHAUSTED), text over `gateway.max_text_bytes` is refused before tokenization (INVALID_ARGUMENT),
and what is tokenized runs on the gateway's text worker thread. Phases, one run, one endpoint per gateway
setting (tiny model, local Ray cluster, loopback):

    idle        health probes only
    refused     attackers send 10 MB text prompts; the default message limit drops them unread
    over-text   text one byte over the default text limit (inside the message limit): refused untokenized
    at-limit    attackers send text of exactly the default byte limit: tokenized (off the loop)
    tokenized   a gateway whose limits admit the big text: each one is tokenized whole on the worker
                (quick: 2 MB texts; full: 10 MB)

Every attacking request also carries t_max < t_min, so whatever is tokenized is then refused (INVALID_ARGUMENT) and
no phase measures the engine. The prober (this process) sends one health Check at a time; the attackers run in
another process. Ratios: each phase's health p99 over the idle p99, measured in the same run.

    python benchmarks/gateway.py --quick
    python benchmarks/gateway.py --json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

QUICK = {"seconds": 4.0, "attackers": 4, "tokenized_mb": 2}
FULL = {"seconds": 15.0, "attackers": 8, "tokenized_mb": 10}
REFUSED_MB = 10
EXPECTED = {"refused": "RESOURCE_EXHAUSTED", "over-text": "INVALID_ARGUMENT", "at-limit": "INVALID_ARGUMENT",
            "tokenized": "INVALID_ARGUMENT"}
PROBE_GAP_S = 0.01


def attack(address: str, text_bytes: int, attackers: int, seconds: float, out) -> None:
    """Runs in a child process: `attackers` threads send text prompts of `text_bytes` until time is up; puts
    (status counts, call latencies in s) on `out`."""
    import grpc

    from dgserve_client.v1 import dgserve_pb2 as pb
    from dgserve_client.v1 import dgserve_pb2_grpc as pb_grpc

    text = ("The quick brown fox jumps over the lazy dog. " * (text_bytes // 45 + 1))[:text_bytes]
    # t_max < t_min is refused after tokenization: the text path is measured, never the engine's prefill
    request = pb.GenerateRequest(text=text, sampler=pb.SamplerParams(t_min=1.0, t_max=0.5))
    codes, latencies, lock = Counter(), [], threading.Lock()
    stop = time.monotonic() + seconds

    def one() -> None:
        opts = [("grpc.max_send_message_length", 64 * 1024**2)]
        with grpc.insecure_channel(address, opts) as ch:
            stub = pb_grpc.DGServeStub(ch)
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    stub.Generate(request, timeout=120)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                with lock:
                    codes[code] += 1
                    latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=one) for _ in range(attackers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((dict(codes), latencies))


def probe(address: str, seconds: float) -> list[float]:
    """Health Check latencies (s), one call at a time, every PROBE_GAP_S."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    out = []
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            stub.Check(health_pb2.HealthCheckRequest(), timeout=60)
            out.append(time.perf_counter() - t0)
            time.sleep(PROBE_GAP_S)
    return out


def phase(name: str, address: str, text_bytes: int | None, args) -> dict:
    codes, attack_lat = {}, []
    if text_bytes is None:
        health = probe(address, args.seconds)
    else:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        child = ctx.Process(target=attack, args=(address, text_bytes, args.attackers, args.seconds, q))
        child.start()
        time.sleep(0.5)  # the attackers are connected and sending
        health = probe(address, args.seconds)
        codes, attack_lat = q.get(timeout=600)
        child.join(60)
    pct = common.percentile
    row = {"phase": name, "text_bytes": text_bytes or 0, "attackers": 0 if text_bytes is None else args.attackers,
           "probes": len(health), "health_ms_p50": 1000 * pct(health, 0.5),
           "health_ms_p99": 1000 * pct(health, 0.99), "health_ms_max": 1000 * max(health),
           "attack_calls": sum(codes.values()), "attack_codes": codes,
           "attack_mb_per_s": sum(codes.values()) * (text_bytes or 0) / 1e6 / args.seconds,
           "attack_ms_p50": 1000 * pct(attack_lat, 0.5) if attack_lat else None}
    return row


def report(rows: list[dict], limits: dict, load: dict, as_json: bool) -> int:
    idle = rows[0]["health_ms_p99"]
    ratios = {r["phase"]: r["health_ms_p99"] / idle for r in rows[1:]}
    lines = ["gateway benchmark: grpc.health.v1 Check latency while attackers send huge text prompts (tiny model, "
             f"loopback); default max_text_bytes {limits['default']}, tokenized phase limit {limits['raised']}"]
    table = [("phase", "text bytes", "attackers", "probes", "health p50 ms", "p99 ms", "max ms", "attack calls",
              "MB/s in", "attack p50 ms", "codes")]
    for r in rows:
        table.append((r["phase"], str(r["text_bytes"]), str(r["attackers"]), str(r["probes"]),
                      f"{r['health_ms_p50']:.2f}", f"{r['health_ms_p99']:.2f}", f"{r['health_ms_max']:.2f}",
                      str(r["attack_calls"]), f"{r['attack_mb_per_s']:.0f}",
                      "-" if r["attack_ms_p50"] is None else f"{r['attack_ms_p50']:.1f}",
                      ",".join(f"{k}:{v}" for k, v in sorted(r["attack_codes"].items())) or "-"))
    lines += common.table(table)
    lines.append("health p99 ratio to idle: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    lines.append("  threads: the prober is 1 thread in this process; the attackers are threads of one other "
                 "process; the gateway is one Serve replica (its event loop + 1 text worker thread)")
    bad = {r["phase"]: r["attack_codes"] for r in rows[1:] if set(r["attack_codes"]) != {EXPECTED[r["phase"]]}}
    ok = not bad
    if bad:
        lines.append(f"ERROR: attacking requests not all refused as expected {EXPECTED}: {bad}")
    print("\n".join(lines + common.load_lines(load)))
    if as_json:
        print(json.dumps({"rows": rows, "health_p99_ratio_to_idle": ratios, "limits": limits,
                          "all_refused_as_expected": ok, "load": load, "contended": load["contended"]}))
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short phases (about a minute in all)")
    p.add_argument("--seconds", type=float, help=f"probe time per phase (default {FULL['seconds']}; quick "
                                                 f"{QUICK['seconds']})")
    p.add_argument("--attackers", type=int, help=f"attacking threads (default {FULL['attackers']}; quick "
                                                 f"{QUICK['attackers']})")
    p.add_argument("--tokenized-mb", type=int, help=f"text size of the tokenized phase (default "
                                                    f"{FULL['tokenized_mb']}; quick {QUICK['tokenized_mb']})")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    load = common.LoadWatch()
    from dgserve.cluster import api
    from dgserve.cluster.gateway.convert import limits_for
    from dgserve.model.config import load_model_config
    from dgserve.model.hub import default_model_dir

    default_limit = limits_for(load_model_config(default_model_dir()), None).max_text_bytes
    raised = args.tokenized_mb * 1024**2 + 1024
    api.start_local(num_cpus=8, temp_dir="/tmp/dgray-bench")
    try:
        base = api.serve_endpoint({"name": "gw-default", "gateway": {"port": api.free_port()},
                                    "http": {"enabled": False}})
        big = api.serve_endpoint({"name": "gw-raised", "gateway": {"port": api.free_port(), "max_text_bytes": raised},
                                   "http": {"enabled": False}})
        if not (base.wait_serving(300) and big.wait_serving(300)):
            raise SystemExit("the endpoints did not become SERVING")
        rows = [phase("idle", base.address, None, args),
                phase("refused", base.address, REFUSED_MB * 1000**2, args),
                phase("over-text", base.address, default_limit + 1, args),
                phase("at-limit", base.address, default_limit, args),
                phase("tokenized", big.address, args.tokenized_mb * 1000**2, args)]
    finally:
        api.shutdown()
    return report(rows, {"default": default_limit, "raised": raised}, load.finish(own=2), args.json)


if __name__ == "__main__":
    sys.exit(main())
