"""The Python API of the cluster: start or join Ray, deploy engine units, submit requests, read their events.

    from dgserve.cluster import api
    api.start_local()                                   # a local Ray cluster (or api.connect("ray://..."))
    unit = api.deploy(api.Topology())                   # the embedded tiny model, one unit
    for event in unit.generate_sync(api.GenerateRequest((2, 651, 1234), seed=7)):
        print(event)
    api.shutdown()
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import ray
from ray import serve

from . import ray_security
from .config import LOOPBACK_HOSTS, Topology, load_topology, parse_topology
from .engine.errors import EngineError
from .engine.events import Event, Failed, Finished
from .messages import GenerateRequest
from .units import unit_app

__all__ = ["Endpoint", "GenerateRequest", "Topology", "Unit", "connect", "deploy", "free_port", "load_topology",
           "leave", "parse_topology", "serve_endpoint", "shutdown", "start_local"]

RAY_ENV = {  # a local cluster; an explicit setting of the user's wins
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's processes keep 127.0.0.1 as their node address
    "RAY_AUTH_MODE": "disabled",  # loopback only, and no token written under the home folder (unless one is given)
    "RAY_USAGE_STATS_ENABLED": "0",
    "GLOO_SOCKET_IFNAME": "lo",  # the rank actors' gloo pairs listen on loopback, not on the hostname's address
    "NCCL_SOCKET_IFNAME": "lo",  # NCCL's bootstrap sockets too (one node: the data goes by P2P / shared memory)
}
LOCAL_TEMP_DIR = "/tmp/dgray"
LOOPBACK_WORKER_HOOK = "dgserve.cluster.ray_security.loopback_worker"  # see there: Serve's replica gRPC port
OBJECT_STORE_BYTES = 256 * 1024**2
_started_here = False  # start_local started the Ray cluster this process is connected to


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A free local port below the kernel's ephemeral range (32768+) and above Ray's worker ports (10002-19999):
    no outgoing connection or Ray worker can take it between now and a server's bind."""
    import random
    import socket

    for _ in range(200):
        port = random.randrange(low, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}..{high}")


def http_options(topology: Topology) -> dict | None:
    """Serve's HTTP proxy options for a topology's OpenAI-compatible API (None: no proxy), HTTPS with the
    gateway's certificate."""
    h, g = topology.http, topology.gateway
    if not h.enabled:
        return None
    out = {"host": h.host, "port": h.port,
           "request_timeout_s": h.request_timeout_s or topology.serve.max_request_s + 5}
    if g.tls:
        out |= {"ssl_certfile": g.tls_cert_file, "ssl_keyfile": g.tls_key_file}
    return out


def _start_serve(http: dict | None) -> None:
    if http is None:
        serve.start(proxy_location="Disabled")
    else:
        serve.start(proxy_location="HeadOnly", http_options=http)


def start_local(num_cpus: int = 8, metrics_interval_s: float | None = None, temp_dir: str | None = None,
                metrics_port: int | None = None, token_file: str | Path | None = None,
                http: dict | None = None, resources: dict[str, float] | None = None) -> None:
    """Start a local Ray instance and Serve: with `http` (`http_options(topology)`), Serve's HTTP proxy on the head
    node serves the OpenAI-compatible API; without it there is no proxy (units are reached through handles).

    Closed by default: every port of the cluster listens on 127.0.0.1 only, and its temp folder and logs are
    readable by their owner only. With `token_file` (or a token Ray finds in RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)
    it also requires Ray's token, against other users of this machine.
    `metrics_interval_s` sets how often replicas and handles push autoscaling metrics (Ray reads it at start).
    `metrics_port`: Prometheus metrics (dgserve's and Ray's) at http://127.0.0.1:PORT/metrics.
    `resources`: custom Ray resources of the node (as the Helm chart's gateway pods offer dgserve_gateway).
    """
    global _started_here
    if not ray.is_initialized():  # a connected driver's auth mode is never switched under it
        ray_security.configure_token(token_file)  # before RAY_ENV: a token turns RAY_AUTH_MODE to token
    os.environ.update({k: v for k, v in RAY_ENV.items() if k not in os.environ})
    if metrics_interval_s is not None:
        for key in ("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
                    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"):
            os.environ[key] = str(metrics_interval_s)
    temp = ray_security.private_temp_dir(temp_dir or LOCAL_TEMP_DIR)
    if not ray.is_initialized():
        extra = {"_metrics_export_port": metrics_port} if metrics_port else {}
        with ray_security.loopback_node(), ray_security.private_umask():
            ray.init(num_cpus=num_cpus, resources=resources, object_store_memory=OBJECT_STORE_BYTES,
                     include_dashboard=False,
                     _temp_dir=str(temp), log_to_driver=False, _node_ip_address=ray_security.LOOPBACK,
                     runtime_env={"worker_process_setup_hook": LOOPBACK_WORKER_HOOK}, **extra)
        _started_here = True
        node_ip = ray.util.get_node_ip_address()
        if node_ip != ray_security.LOOPBACK:  # never serve from a cluster that listens on the network
            ray.shutdown()
            _started_here = False
            raise RuntimeError(f"the local Ray cluster took the node address {node_ip}, not 127.0.0.1")
    _start_serve(http)


def connect(address: str, token_file: str | Path | None = None, http: dict | None = None) -> None:
    """Join an existing Ray cluster (`ray://host:10001`, `host:6379` or `auto`).

    With `token_file` (or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) this driver uses Ray's token authentication; it
    warns when the cluster it joined does not require a token."""
    if not ray.is_initialized():
        ray_security.configure_token(token_file)
        loopback = ray_security.address_host(address) in LOOPBACK_HOSTS
        # Ray would turn a loopback address into the machine's external one: a loopback-only head is not there.
        with ray_security.loopback_node() if loopback else contextlib.nullcontext():
            ray.init(address=address)
    ray_security.warn_if_open(address)
    _start_serve(http)  # a Serve instance that runs already keeps its own HTTP options


def deploy(topology: Topology | dict | str | Path | None = None) -> Unit:
    """Deploy (or update) the engine units of a topology; returns once they are ready."""
    topo = _topology(topology)
    if topo.model is None:  # make the embedded model once, here, not in every rank at the same time
        from dgserve.model.hub import default_model_dir

        default_model_dir()
    handle = serve.run(unit_app(topo), name=topo.name, route_prefix=None)
    return Unit(handle, topo)


def serve_endpoint(topology: Topology | dict | str | Path | None = None) -> Endpoint:
    """Deploy the whole endpoint (gRPC gateway + engine units); returns once the gateway listens."""
    topo = _topology(topology)
    if topo.model is None:
        from dgserve.model.hub import default_model_dir

        default_model_dir()
    from .gateway.deployment import gateway_app, route_prefix

    ingress = serve.run(gateway_app(topo), name=topo.name, route_prefix=route_prefix(topo))
    if not topo.http.enabled:
        return Endpoint(ingress, topo, ingress.address.remote().result())
    handle = serve.get_deployment_handle("Gateway", app_name=topo.name)
    return Endpoint(handle, topo, handle.address.remote().result(), ingress, http_address(topo))


def http_address(topo: Topology) -> str:
    """The base URL of the HTTP API (`.../v1` is what OpenAI clients take), on the Serve instance's proxy: its
    own host and port where Serve ran before this topology (a joined cluster), else the topology's."""
    from ray.serve.context import _get_global_client

    try:
        opts = _get_global_client().http_config
        host, port = opts.host, opts.port
    except Exception:  # not connected to Serve: the topology's settings
        host, port = topo.http.host, topo.http.port
    scheme = "https" if topo.gateway.tls else "http"
    host = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host and host[0] != "[" else host
    return f"{scheme}://{host}:{port}{topo.http.route_prefix.rstrip('/')}"


class Endpoint:
    def __init__(self, handle, topology: Topology, address: str, http_handle=None, http_url: str | None = None):
        """`handle`: the gRPC gateway; `http_handle` and `http_url`: the HTTP API's ingress and base URL (None when
        `http.enabled` is false)."""
        self.handle, self.topology, self.address = handle, topology, address
        self.http_handle, self.http_url = http_handle, http_url

    def drain(self, grace_s: float | None = None) -> dict:
        """Both fronts stop taking requests and let theirs finish within the grace period, at the same time."""
        grpc_left = self.handle.drain.remote(grace_s)
        http_left = self.http_handle.drain.remote(grace_s) if self.http_handle is not None else None
        failed = grpc_left.result()["failed"] + (http_left.result()["failed"] if http_left is not None else [])
        return {"failed": failed}

    def status(self) -> dict:
        return self.handle.status.remote().result()

    def wait_serving(self, timeout: float) -> bool:
        """True once the gateway says SERVING (its warm-up request went through a unit); asked through Serve, so
        it works whatever the gRPC port's TLS and keys."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.status()["serving"]:
                return True
            time.sleep(0.2)
        return False


def _topology(topology) -> Topology:
    if topology is None:
        return Topology()
    if isinstance(topology, Topology):
        return topology
    if isinstance(topology, dict):
        return parse_topology(topology)
    return load_topology(topology)


def shutdown() -> None:
    """Delete the Serve applications (their replicas stop gracefully), then shut Ray down.

    On the local cluster of `start_local`, Serve's controller ends with the cluster, after this driver has
    disconnected. `serve.shutdown()` is not used there: it kills the controller while this driver still has calls
    pending on it (its handles' long polls, and `graceful_shutdown` itself, which returns only when the controller is
    gone); Ray retries each and reports it to the driver as "(raylet) Task ServeController.listen_for_change failed
    ... killed by `ray.kill`". On a joined cluster Serve is shut down (its controller included), as before."""
    global _started_here
    if not ray.is_initialized():
        return
    try:
        with quiet_serve():
            if _started_here:
                for name in serve.status().applications:
                    serve.delete(name)
            else:
                serve.shutdown()
    finally:
        ray.shutdown()
        _started_here = False


def leave(name: str) -> None:
    """Delete one application and disconnect, leaving the (joined) cluster and its Serve instance running."""
    if not ray.is_initialized():
        return
    try:
        with quiet_serve():
            serve.delete(name)
    finally:
        ray.shutdown()


@contextlib.contextmanager
def quiet_serve():
    """Serve's driver-side INFO lines ("Deleting app ...") off for the block; its warnings and errors still show."""
    logger = logging.getLogger("ray.serve")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


class Unit:
    """Requests to the engine units of one deployment (Serve's router picks a unit per request)."""

    def __init__(self, handle, topology: Topology):
        self.handle, self.topology = handle, topology

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Event]:
        response = self.handle.options(stream=True).generate.remote(request)
        try:
            async for event in response:
                yield event
        finally:
            response.cancel()  # no-op once it ended; frees the request on rank 0 if the caller stopped early

    async def generate(self, request: GenerateRequest) -> Finished:
        """The final event; an error event is raised as EngineError (with its code)."""
        final = None
        async for event in self.stream(request):
            final = event
        return _final(final)

    def stream_sync(self, request: GenerateRequest) -> Iterator[Event]:
        response = self.handle.options(stream=True).generate.remote(request)
        try:
            yield from response
        finally:
            response.cancel()

    def generate_sync(self, request: GenerateRequest) -> Finished:
        final = None
        for event in self.stream_sync(request):
            final = event
        return _final(final)

    def status(self) -> dict:
        """One unit's status (Serve picks the replica): its ranks, requests, budget, health."""
        return self.handle.status.remote().result()

    async def status_async(self) -> dict:
        return await self.handle.status.remote()


def _final(event) -> Finished:
    if isinstance(event, Failed):
        raise EngineError(event.message, event.code)
    if not isinstance(event, Finished):
        raise EngineError("the stream ended without a final event")
    return event
