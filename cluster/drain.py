"""A pod's drain before Kubernetes stops it (the Helm chart's preStop hook runs `dgserve drain-pod`).

Two parts, both bounded by the pod's grace period:
- the fronts on this pod (the gRPC gateway, and the HTTP ingress beside it) drain through a file: the hook creates
  `gateway.drain_file`, each front sees it (they poll), stops taking calls (the gateway's health goes NOT_SERVING,
  so the Services drop the pod; the HTTP API answers 503), lets in-flight calls finish within `gateway.grace_s`,
  and writes `<drain_file>.<front>.done` with what it had to fail; the hook waits for the reports it expects;
- with `--ray`, Ray drains this node (`ray drain-node`, reason preemption, with the deadline): Serve starts the
  node's replicas elsewhere and stops these ones gracefully (their `graceful_shutdown_timeout_s`), which is how an
  engine unit's requests finish before its pod goes. Serve moves a replica when its own actor is on the node: a
  unit whose replica lives elsewhere but has rank actors here (profile disaggregated, an attention or expert pod)
  is not drained by this; its ranks stop with the pod and the unit is rebuilt (its requests fail as retryable).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

FRONTS = ("gateway", "http")


def done_path(path: str | Path, front: str = "gateway") -> Path:
    p = Path(path)
    return p.with_name(f"{p.name}.{front}.done")


async def watch(path: str | Path, drain: Callable[[], Awaitable[dict]], front: str = "gateway",
                period_s: float = 0.5) -> dict:
    """Wait for the drain file, then drain and write this front's report (the front's side)."""
    p = Path(path)
    while not p.exists():
        await asyncio.sleep(period_s)
    left = await drain()
    done = done_path(p, front)
    part = done.with_name(done.name + ".part")
    part.write_text(json.dumps({"failed": list(left.get("failed", []))}))
    part.replace(done)  # whole or absent: the hook never reads half a report
    return left


def request(path: str | Path, wait_s: float, fronts: tuple[str, ...] = ("gateway",),
            period_s: float = 0.2) -> dict[str, dict | None]:
    """Create the drain file and wait up to `wait_s` for each front's report (the hook's side); a front whose
    report did not come (none on this pod, or it did not finish in time) maps to None."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    for front in fronts:
        done_path(p, front).unlink(missing_ok=True)
    p.touch()
    deadline = time.monotonic() + wait_s
    while True:
        got = {f: json.loads(done_path(p, f).read_text()) if done_path(p, f).exists() else None for f in fronts}
        if all(v is not None for v in got.values()) or time.monotonic() >= deadline:
            return got
        time.sleep(period_s)


def ray_drain_command(deadline_s: float, node_id: str) -> list[str]:
    return ["ray", "drain-node", "--node-id", node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message", "dgserve drain-pod: the pod is stopping",
            "--deadline-remaining-seconds", str(max(1, int(deadline_s)))]


def _connect() -> str:
    """This pod's Ray node id, as a driver on the local node (KubeRay's env gives the address and the token)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
    return ray.get_runtime_context().get_node_id()


def serve_replicas_here(timeout_s: float) -> int:
    """Serve replicas alive on this pod's Ray node."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("node_id", "=", _connect()), ("state", "=", "ALIVE")], limit=10_000,
                         timeout=max(1, int(timeout_s)))
    return sum(1 for a in actors if a.class_name.startswith("ServeReplica"))


def _run(cmd: list[str], timeout_s: float) -> int:
    try:
        return subprocess.call(cmd, timeout=max(1.0, timeout_s))
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"{cmd[0]}: {type(e).__name__}: {e}", flush=True)
        return -1


def drain_pod(grace_s: float, gateway_file: str | None, ray: bool, fronts: tuple[str, ...] = ("gateway",),
              run: Callable[[list[str], float], int] = _run, node_id: Callable[[], str] = _connect,
              replicas_here: Callable[[float], int] = serve_replicas_here, period_s: float = 1.0) -> list[str]:
    """The preStop hook: returns the lines it reports. Never raises and never outlives `grace_s` by more than one
    call's timeout: a pod must stop whatever happens here."""
    deadline = time.monotonic() + grace_s
    lines = []
    if ray:
        try:
            rc = run(ray_drain_command(grace_s, node_id()), deadline - time.monotonic())
        except Exception as e:  # no Ray here (or not reachable): nothing to drain through it
            rc, why = -1, f"{type(e).__name__}: {e}"
        else:
            why = f"exit {rc}"
        if rc != 0:
            lines.append(f"ray drain-node failed ({why}); the node's replicas stop with the pod")
        else:
            left = _wait_replicas(replicas_here, deadline, period_s)
            lines.append("ray: this node's Serve replicas moved away" if left == 0 else
                         f"ray: Serve replicas still here at the deadline: {left}")
    if gateway_file:
        reports = request(gateway_file, max(0.0, deadline - time.monotonic()), fronts)
        for front, left in reports.items():
            lines.append(f"{front}: no drain report (none on this pod, or it did not finish)" if left is None
                         else f"{front} drained: {len(left['failed'])} request(s) failed")
    return lines


def _wait_replicas(replicas_here: Callable[[float], int], deadline: float, period_s: float) -> int | str:
    last: int | str = "unknown (no time left to ask)"
    while True:
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            return last
        try:
            last = replicas_here(left_s)
        except Exception as e:  # Ray is going away under us, or did not answer in time
            return f"unknown ({type(e).__name__})"
        if last == 0:
            return 0
        time.sleep(min(period_s, max(0.0, deadline - time.monotonic())))
