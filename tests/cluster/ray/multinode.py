"""The attention/expert split through the gRPC gateway on a labelled multi-node Ray cluster on this machine.

Run by test_multinode.py in a process of its own (a driver joins one Ray cluster, and the test session already has
its own): `python -m tests.cluster.ray.multinode SPEC.json OUT.json`. A `ray.cluster_utils.Cluster` of three nodes,
every one on 127.0.0.1: a head (the Serve controller and the gateway), a node labelled role=attention and one
labelled role=experts. Two endpoints run one after the other:

1. `packed` 1 + 2 (one STRICT_PACK placement group, an uneven explicit expert map): the spec's requests at once;
2. `disaggregated` 2 + 2 (attention bundles on role=attention, expert bundles on role=experts): the requests at
   once, then an expert rank killed by pid while a stream is in flight, then the first request again once the unit
   is back.

It writes what it saw (token ids, rank placement, step statistics, the failure's code and timings) to OUT.json; the
test compares the tokens with single-process `generate` and checks the rest.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                   "RAY_USAGE_STATS_ENABLED": "0", "GLOO_SOCKET_IFNAME": "lo"})  # before `import ray`

LOOPBACK = "127.0.0.1"
NODES = ({"num_cpus": 4, "labels": {"role": "attention"}}, {"num_cpus": 3, "labels": {"role": "experts"}})


def start_cluster(temp: str):
    from ray._common.utils import get_default_ray_temp_dir
    from ray.cluster_utils import Cluster

    from dgserve.cluster import ray_security

    # Cluster writes the head's address to the default temp dir (/tmp/ray) whatever temp_dir says; on a fresh
    # machine that folder does not exist yet
    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
    with ray_security.loopback_node():  # every node keeps 127.0.0.1 as its address
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "node_ip_address": LOOPBACK, "include_dashboard": False, "temp_dir": temp})
        for node in NODES:
            cluster.add_node(node_ip_address=LOOPBACK, **node)
    cluster.wait_for_nodes()
    return cluster


def run_requests(address: str, reqs: list[dict]) -> list[list[int]]:
    """All requests at once, one client thread each; their token ids in order."""
    from dgserve_client import Client

    out: list = [None] * len(reqs)

    def one(i: int) -> None:
        r = reqs[i]
        with Client(address) as c:
            out[i] = list(c.generate(token_ids=r["prompt_ids"], seed=r["seed"], **r["sampler"]).token_ids)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


def unit_status(name: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle("EngineUnit", app_name=name).status.remote().result()


def endpoint(name: str, model: str, **topology):
    from dgserve.cluster import api

    topo = {"name": name, "model": model, "gateway": {"port": api.free_port()}, "http": {"enabled": False},
            "engine": {"max_running": 4},
            "watchdog_s": 3, "serve": {"health_check_period_s": 1.0, "health_check_timeout_s": 5.0}} | topology
    ep = api.serve_endpoint(topo)
    assert ep.wait_serving(180), f"{name}: the gateway never became SERVING"
    return ep


def packed(model: str, reqs: list[dict]) -> dict:
    from ray import serve

    ep = endpoint("packed", model, profile="packed", attention_ranks=1, expert_ranks=2,
                  expert_map={0: [7], 1: [0, 1, 2, 3, 4, 5, 6]})
    tokens = run_requests(ep.address, reqs)
    st = unit_status("packed")
    serve.delete("packed")
    return {"tokens": tokens, "started": st["started"], "steps": st["ranks"][0]["steps"],
            "all_to_all": st["ranks"][0]["all_to_all"]}


def kill_an_expert_rank_mid_stream(address: str, pid: int) -> dict:
    """A long stream; after its first message the expert rank `pid` is killed: how the stream ended, and when."""
    from dgserve_client import Client, DGServeClientError

    with Client(address, retries=0) as c:
        stream = c.generate_stream(token_ids=[5, 6, 7], max_new_tokens=32 * 30, max_denoising_steps=48)
        next(stream)
        os.kill(pid, signal.SIGKILL)
        hit = time.monotonic()
        try:
            for _ in stream:
                pass
        except DGServeClientError as e:
            return {"error": type(e).__name__, "code": e.code.name, "after_s": time.monotonic() - hit}
    return {"error": None, "after_s": time.monotonic() - hit}


def disaggregated(model: str, reqs: list[dict]) -> dict:
    import ray

    from dgserve_client import Client

    ep = endpoint("disaggregated", model, profile="disaggregated", attention_ranks=2, expert_ranks=2,
                  node_labels={"attention": {"role": "attention"}, "experts": {"role": "experts"}})
    tokens = run_requests(ep.address, reqs)
    before = unit_status("disaggregated")
    labels = {n["NodeID"]: n.get("Labels", {}) for n in ray.nodes() if n["Alive"]}
    placed = [{"role": s["role"], "node_role": labels.get(s["node"], {}).get("role")} for s in before["started"]]
    victim = next(s["pid"] for s in before["started"] if s["role"] == "experts")
    killed = kill_an_expert_rank_mid_stream(ep.address, victim)
    t0, again = time.monotonic(), None
    while again is None and time.monotonic() - t0 < 90:  # the client's retry loop (the SDK's own retries too)
        try:
            with Client(ep.address) as c:
                r = reqs[0]
                again = list(c.generate(token_ids=r["prompt_ids"], seed=r["seed"], **r["sampler"]).token_ids)
        except Exception:
            time.sleep(1)
    after = unit_status("disaggregated")
    return {"tokens": tokens, "placed": placed, "killed": killed, "back_s": time.monotonic() - t0, "again": again,
            "new_unit": after["unit"] != before["unit"], "pids_after": [s["pid"] for s in after["started"]]}


def main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    with tempfile.TemporaryDirectory(prefix="dgray-mn-", dir="/tmp") as temp:
        cluster = start_cluster(temp)
        try:
            from dgserve.cluster import api

            api.connect(cluster.address)
            out = {"packed": packed(spec["model"], spec["requests"]),
                   "disaggregated": disaggregated(spec["model"], spec["requests"])}
            Path(out_path).write_text(json.dumps(out))
        finally:
            api.shutdown()
            cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
