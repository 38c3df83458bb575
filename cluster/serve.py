"""`dgserve serve`: the main job. Start (or join) Ray, deploy the gateway and the engine units, serve until
SIGINT/SIGTERM, then drain and shut down, leaving no process behind."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time

log = logging.getLogger("dgserve.serve")


def run(args) -> int:
    from dgserve.cluster import api

    from .config import Topology, load_topology, parse_topology

    topo = load_topology(args.config) if args.config else Topology()
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("api_keys_file", args.api_keys_file),
                                   ("tls_cert_file", args.tls_cert), ("tls_key_file", args.tls_key),
                                   ("tls_client_ca_file", args.tls_client_ca)) if v is not None}
    if args.insecure_remote:
        overrides["insecure_remote"] = True
    http = {k: v for k, v in (("host", args.http_host), ("port", args.http_port)) if v is not None}
    if args.no_http:
        http["enabled"] = False
    if overrides or http:
        raw = topo.to_dict()
        raw["gateway"] = {**raw["gateway"], **overrides}
        raw["http"] = {**raw["http"], **http}
        topo = parse_topology(raw)
    stop = threading.Event()

    def on_signal(*_):
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    started_ray = args.address is None
    t0 = time.monotonic()
    print(f"starting {'a local Ray cluster' if started_ray else 'on Ray at ' + args.address} ...", flush=True)
    try:
        if started_ray:
            api.start_local(num_cpus=args.num_cpus, metrics_interval_s=topo.serve.metrics_interval_s,
                            temp_dir=args.temp_dir, metrics_port=args.metrics_port or None,
                            token_file=args.ray_token_file, http=api.http_options(topo))
        else:  # warns when the cluster does not require Ray's token
            api.connect(args.address, token_file=args.ray_token_file, http=api.http_options(topo))
        # Ray's core worker installs its own SIGTERM handler in this process (it aborts): take the signals back.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        endpoint = api.serve_endpoint(topo)
        if not endpoint.wait_serving(timeout=600):
            print("error: the gateway did not become SERVING within 600 s", file=sys.stderr)
            return 1
        model = topo.model or "the embedded tiny model (random weights: its text is noise)"
        print(f"dgserve is serving {model} on {endpoint.address} (ready in {time.monotonic() - t0:.1f}s)")
        print(f"try:  .venv/bin/dgserve-client --target {endpoint.address}{_client_flags(topo.gateway)} generate "
              f"--prompt 'Hello' --json")
        if endpoint.http_url:
            key = " -H 'Authorization: Bearer KEY'" if topo.gateway.auth else ""
            print(f"OpenAI-compatible HTTP API on {endpoint.http_url}/v1 (model {topo.served_model_name!r})")
            print(f"try:  curl{' --cacert CA.pem' if topo.gateway.tls else ''}{key} {endpoint.http_url}/v1/chat/"
                  f"completions -H 'Content-Type: application/json' -d '{{\"model\": \"{topo.served_model_name}\", "
                  f"\"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'")
        if started_ray and args.metrics_port:
            print(f"metrics (Prometheus): http://127.0.0.1:{args.metrics_port}/metrics")
        print("Ctrl-C stops it.", flush=True)
        while not stop.wait(0.5):
            pass
        print("stopping: draining in-flight requests ...", flush=True)
        left = endpoint.drain()
        if left["failed"]:
            print(f"{len(left['failed'])} request(s) did not finish within the grace period (UNAVAILABLE)")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
        _shutdown(api, topo, started_ray)
    print("stopped", flush=True)
    return 0


def _shutdown(api, topo, started_ray: bool) -> None:
    """Ray's own lines stay out of a clean stop: see `api.shutdown` (the order) and `api.quiet_serve`."""
    import ray

    if not ray.is_initialized():
        return
    try:
        if started_ray:
            api.shutdown()
        else:
            api.leave(topo.name)
    except Exception as e:  # clean-up must go on
        log.warning("shutdown: %s", e)


def _client_flags(gateway) -> str:
    """The dgserve-client flags this gateway needs (file names are placeholders for the client's own)."""
    flags = ""
    if gateway.tls:
        flags += " --tls-ca CA.pem"
    if gateway.tls_client_ca_file:
        flags += " --tls-cert CLIENT.crt --tls-key CLIENT.key"
    if gateway.auth:
        flags += " --api-key-file KEY_FILE"
    return flags
