"""The topology file: one YAML document, typed and validated.

The same file is what `dgserve serve --config` reads and what the Helm chart renders. Every error names the
field (as a dotted path), the value and what is allowed. Unknown keys are errors, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from dgserve.model.dtypes import EXPERTS_DTYPES, resolve_dtype
from dgserve.model.errors import ConfigError
from dgserve.model.settings import KNOBS
from dgserve.model.validate import is_int, is_number, require

from .engine.config import EngineConfig

PROFILES = ("replicated", "packed", "disaggregated")
DTYPES = ("auto", "float32", "bfloat16")


def _need(path: str, value, ok: bool, allowed: str) -> None:
    require(ok, path, value, allowed, "topology")


def _section(raw, path: str, known: set[str]) -> dict:
    if raw is None:
        return {}
    _need(path, raw, isinstance(raw, dict), "a mapping")
    for key in raw:
        _need(f"{path}.{key}" if path else key, raw[key], key in known, f"a key in {sorted(known)}")
    return raw


@dataclass(frozen=True)
class Units:
    min: int = 1
    max: int = 1
    initial: int | None = None


@dataclass(frozen=True)
class RankResources:
    cpus: float = 1.0
    gpus: float = 0.0


@dataclass(frozen=True)
class ServeSettings:
    max_ongoing_requests: int | None = None  # None: the unit's capacity (A x (max_running + max_queued))
    # Requests a gateway replica lets wait for a unit slot (Serve's max_queued_requests, per caller); beyond it
    # they are refused at once with RESOURCE_EXHAUSTED and a retry hint. None: max_ongoing_requests (Serve's router
    # also counts a burst's requests while it picks replicas, so a much smaller bound refuses bursts a unit has
    # room for).
    max_queued_requests: int | None = None
    target_ongoing_requests: float | None = None  # None: A x max_running (a unit's running capacity)
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_period_s: float = 30.0
    metrics_interval_s: float = 10.0  # replica and handle metric pushes (RAY_SERVE_*_METRIC_PUSH_INTERVAL_S)
    max_request_s: float = 600.0  # the longest a request may run; the graceful shutdown waits at least this
    graceful_shutdown_timeout_s: float | None = None  # None: max_request_s + 10
    health_check_period_s: float = 2.0  # a failed unit is replaced this soon after its failure (plus its start)
    health_check_timeout_s: float = 30.0


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost", "[::1]")


@dataclass(frozen=True)
class GatewaySettings:
    host: str = "127.0.0.1"  # another address needs TLS (or insecure_remote: true)
    port: int = 50051
    # The largest request message (None: what the largest valid prompt needs); gRPC refuses a larger one with
    # RESOURCE_EXHAUSTED before reading it, which keeps floods of huge messages cheap.
    max_message_bytes: int | None = None
    max_prompt_tokens: int | None = None  # None: the context length minus one block
    # Text is refused above this many UTF-8 bytes before any tokenization (None: 8 bytes per prompt token).
    max_text_bytes: int | None = None
    # Room in a request for its images and videos (encoded bytes); part of the derived message limit. None: 32 MiB
    # when the checkpoint has a vision tower, else none.
    max_media_bytes: int | None = None
    grace_s: float = 30.0  # on SIGTERM: in-flight requests get this long, the rest fail with UNAVAILABLE
    retry_pushback_ms: int = 1000  # the retry hint sent with RESOURCE_EXHAUSTED (trailer grpc-retry-pushback-ms)
    probe_period_s: float = 1.0  # how often the gateway checks that a unit can serve (its health follows)
    keepalive_s: float = 30.0
    # API keys: one per line in a file (a mounted Kubernetes Secret), and/or in an environment variable (a Secret
    # as env); comma- or newline-separated. With any key set, every call but health needs
    # `authorization: Bearer <key>`.
    api_keys_file: str | None = None
    api_keys_env: str | None = None
    # TLS: PEM certificate chain and private key; with a client CA, clients must present a certificate (mTLS).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    insecure_remote: bool = False  # plaintext on a non-loopback host (e.g. behind a mesh that terminates TLS)
    # Gateway replicas (at most one per Ray node: each binds `port`). `ray_resources` are custom Ray resources each
    # replica takes, so they land only on nodes offering them (the Helm chart's `gateway` worker group gives each
    # pod one, which places one gateway per pod, on pods its gRPC Service selects).
    replicas: int = 1
    ray_resources: dict[str, float] = field(default_factory=dict)
    # A file whose appearance makes this node's gateway drain (stop taking calls, let in-flight ones finish within
    # grace_s), then write `<drain_file>.done`: a pod's preStop hook (`dgserve drain-pod`) touches it.
    drain_file: str | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def auth(self) -> bool:
        return self.api_keys_file is not None or self.api_keys_env is not None


@dataclass(frozen=True)
class HttpSettings:
    """The OpenAI-compatible HTTP API, served by Ray Serve's HTTP proxy. The proxy is one per Ray cluster, so
    `host` and `port` take effect where dgserve starts Serve (`dgserve serve` on its own cluster); a joined
    cluster keeps its Serve's HTTP options. API keys and TLS are the gateway's (`gateway.api_keys_*`,
    `gateway.tls_*`)."""

    enabled: bool = True
    host: str = "127.0.0.1"  # another address needs TLS (or gateway.insecure_remote: true)
    port: int = 8000
    route_prefix: str = "/"  # the routes are {route_prefix}/v1/chat/completions, ... ("/": /v1/...)
    served_model_name: str | None = None  # the `model` clients send; None: `model`, or "dgserve/tiny"
    request_timeout_s: float | None = None  # the proxy's timeout per request (None: serve.max_request_s)
    replicas: int = 1  # the HTTP ingress deployment's replicas (Serve's proxies route to them from every node)
    ray_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources each ingress replica takes


@dataclass(frozen=True)
class Topology:
    model: str | None = None  # folder or hub id; None: the embedded tiny model
    revision: str | None = None
    dtype: str = "auto"  # bfloat16 on CUDA, float32 on CPU (weights_dtype)
    experts_dtype: str = "auto"  # the routed experts: as dtype, or "fp8" (quantized at load; kernels/fp8)
    device: str = "cpu"
    profile: str = "replicated"
    units: Units = field(default_factory=Units)
    attention_ranks: int = 1
    expert_ranks: int = 0
    # Which expert rank holds which routed experts: {expert rank: [expert ids]}, every expert exactly once (checked
    # against the checkpoint when the unit starts). None: balanced contiguous blocks.
    expert_map: dict[int, list[int]] | None = None
    resources: dict[str, RankResources] = field(default_factory=lambda: {"attention": RankResources(),
                                                                        "experts": RankResources()})
    node_labels: dict[str, dict[str, str]] = field(default_factory=lambda: {"attention": {}, "experts": {}})
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampler: dict = field(default_factory=dict)  # overrides of generation_config.json defaults
    watchdog_s: float = 10.0
    serve: ServeSettings = field(default_factory=ServeSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    name: str = "dgserve"

    @property
    def weights_dtype(self) -> str:
        """The dtype the weights load in (`auto` resolved for the device)."""
        return resolve_dtype(self.dtype, self.device)

    @property
    def graceful_shutdown_s(self) -> float:
        s = self.serve
        return s.graceful_shutdown_timeout_s if s.graceful_shutdown_timeout_s is not None else s.max_request_s + 10

    @property
    def served_model_name(self) -> str:
        """The model id of the HTTP API (`GET /v1/models`, and the `model` a request must name)."""
        return self.http.served_model_name or self.model or "dgserve/tiny"

    @property
    def world(self) -> int:
        """The unit's ranks: attention ranks (group ranks 0..A-1), then expert ranks."""
        return self.attention_ranks + self.expert_ranks

    @property
    def running_capacity(self) -> int:
        return self.attention_ranks * self.engine.max_running

    @property
    def max_ongoing(self) -> int:
        if self.serve.max_ongoing_requests is not None:
            return self.serve.max_ongoing_requests
        return self.attention_ranks * (self.engine.max_running + self.engine.max_queued)

    @property
    def max_queued_requests(self) -> int:
        if self.serve.max_queued_requests is not None:
            return self.serve.max_queued_requests
        return self.max_ongoing

    def to_dict(self) -> dict:
        """Plain data (what crosses to the replicas and rank actors)."""
        from dataclasses import asdict

        return asdict(self)


def actor_options(cpus: float, resources: dict[str, float]) -> dict:
    """A front replica's Ray options: its CPUs, and the custom resources that place it (e.g. one per pod)."""
    return {"num_cpus": cpus} | ({"resources": dict(resources)} if resources else {})


def parse_topology(raw: dict | None) -> Topology:
    top = _section(raw or {}, "", {f.name for f in fields(Topology)})
    kw: dict = {}
    for key in ("model", "revision"):
        if top.get(key) is not None:
            _need(key, top[key], isinstance(top[key], str) and top[key] != "", "a non-empty string")
            kw[key] = top[key]
    if "name" in top:
        _need("name", top["name"], isinstance(top["name"], str) and top["name"].replace("-", "").isalnum(),
              "letters, digits and '-'")
        kw["name"] = top["name"]
    for key, allowed in (("dtype", DTYPES), ("experts_dtype", EXPERTS_DTYPES), ("profile", PROFILES),
                         ("device", ("cpu", "cuda"))):
        if key in top:
            _need(key, top[key], top[key] in allowed, " | ".join(allowed))
            kw[key] = top[key]
    kw["units"] = _units(top.get("units"))
    for key in ("attention_ranks", "expert_ranks"):
        if key in top:
            lo = 1 if key == "attention_ranks" else 0
            _need(key, top[key], is_int(top[key]) and lo <= top[key] <= 1024, f"an integer in {lo}..1024")
            kw[key] = top[key]
    _profile_ranks(kw.get("profile", "replicated"), kw.get("expert_ranks", 0))
    if top.get("expert_map") is not None:
        kw["expert_map"] = _expert_map(top["expert_map"], kw.get("expert_ranks", 0))
    kw["resources"] = _resources(top.get("resources"))
    kw["node_labels"] = _labels(top.get("node_labels"))
    engine = _section(top.get("engine"), "engine", {f.name for f in fields(EngineConfig)})
    try:
        kw["engine"] = EngineConfig(**engine)
    except ConfigError as e:
        raise ConfigError(f"engine.{e.field}", e.value, e.allowed, "topology") from e
    sampler = _section(top.get("sampler"), "sampler", set(KNOBS))
    kw["sampler"] = dict(sampler)
    if "watchdog_s" in top:
        _need("watchdog_s", top["watchdog_s"], is_number(top["watchdog_s"]) and 0.1 <= top["watchdog_s"] <= 3600,
              "a number of seconds in 0.1..3600")
        kw["watchdog_s"] = float(top["watchdog_s"])
    kw["serve"] = _serve(top.get("serve"))
    kw["gateway"] = _gateway(top.get("gateway"))
    kw["http"] = _http(top.get("http"), kw["gateway"])
    return Topology(**kw)


def _ray_resources_ok(v) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str) and k != "" and k not in ("CPU", "GPU", "memory", "object_store_memory")
        and is_number(n) and 0 < n <= 1000 for k, n in v.items())


# How many replicas a front (the gateway, the HTTP ingress) has, and the custom Ray resources that place them.
FRONT_PLACEMENT_CHECKS = {
    "replicas": (lambda v: is_int(v) and 1 <= v <= 1000, "an integer in 1..1000"),
    "ray_resources": (_ray_resources_ok,
                      "a mapping of custom Ray resource names (not CPU, GPU or memory) to numbers in (0, 1000]"),
}


def _float_resources(section: dict) -> dict:
    return {**section, "ray_resources": {k: float(n) for k, n in section.get("ray_resources", {}).items()}}


def _gateway(raw) -> GatewaySettings:
    g = _section(raw, "gateway", {f.name for f in fields(GatewaySettings)})
    checks = {
        "host": (lambda v: isinstance(v, str) and v != "", "a host name or address"),
        "port": (lambda v: is_int(v) and 0 <= v <= 65535, "an integer in 0..65535 (0: any free port)"),
        "max_message_bytes": (lambda v: v is None or (is_int(v) and 1024 <= v <= 2**31 - 1),
                              "null or an integer in 1024..2147483647"),
        "max_prompt_tokens": (lambda v: v is None or (is_int(v) and v >= 1), "null or an integer >= 1"),
        "grace_s": (lambda v: is_number(v) and 0 <= v <= 3600, "a number of seconds in 0..3600"),
        "keepalive_s": (lambda v: is_number(v) and 1 <= v <= 3600, "a number of seconds in 1..3600"),
        "retry_pushback_ms": (lambda v: is_int(v) and 0 <= v <= 3_600_000, "an integer in 0..3600000"),
        "probe_period_s": (lambda v: is_number(v) and 0.1 <= v <= 60, "a number of seconds in 0.1..60"),
        "max_text_bytes": (lambda v: v is None or (is_int(v) and 1 <= v <= 2**31 - 1),
                           "null or an integer in 1..2147483647"),
        "max_media_bytes": (lambda v: v is None or (is_int(v) and 0 <= v <= 2**30),
                            "null or an integer in 0..1073741824"),
        "insecure_remote": (lambda v: isinstance(v, bool), "true or false"),
        **FRONT_PLACEMENT_CHECKS,
    }
    for key in ("api_keys_file", "drain_file", "tls_cert_file", "tls_key_file", "tls_client_ca_file"):
        checks[key] = (lambda v: v is None or (isinstance(v, str) and v != ""), "null or a file path")
    checks["api_keys_env"] = (lambda v: v is None or (isinstance(v, str) and v.replace("_", "").isalnum()),
                              "null or an environment variable name")
    for key, value in g.items():
        ok, allowed = checks[key]
        _need(f"gateway.{key}", value, ok(value), allowed)
    out = GatewaySettings(**_float_resources(g))
    _need("gateway.tls_key_file", out.tls_key_file, (out.tls_cert_file is None) == (out.tls_key_file is None),
          "set together with gateway.tls_cert_file (a certificate and its private key)")
    _need("gateway.tls_client_ca_file", out.tls_client_ca_file, out.tls_client_ca_file is None or out.tls,
          "only with gateway.tls_cert_file and tls_key_file (client certificates need TLS)")
    _need("gateway.host", out.host, out.host in LOOPBACK_HOSTS or out.tls or out.insecure_remote,
          f"a loopback address ({', '.join(LOOPBACK_HOSTS[:3])}) without TLS: set gateway.tls_cert_file and "
          "tls_key_file to listen on another address, or gateway.insecure_remote: true for plaintext behind a "
          "proxy or mesh that terminates TLS")
    return out


def _http(raw, gateway: GatewaySettings) -> HttpSettings:
    h = _section(raw, "http", {f.name for f in fields(HttpSettings)})
    checks = {
        "enabled": (lambda v: isinstance(v, bool), "true or false"),
        "host": (lambda v: isinstance(v, str) and v != "", "a host name or address"),
        "port": (lambda v: is_int(v) and 1 <= v <= 65535, "an integer in 1..65535"),
        "route_prefix": (lambda v: isinstance(v, str) and v.startswith("/") and (v == "/" or not v.endswith("/"))
                         and v.isprintable() and " " not in v and "{" not in v,
                         "/ or a path that starts with '/' and does not end with it (e.g. /openai)"),
        "served_model_name": (lambda v: v is None or (isinstance(v, str) and 0 < len(v) <= 256 and v.isprintable()),
                              "null or a printable string of 1..256 characters"),
        "request_timeout_s": (lambda v: v is None or (is_number(v) and v > 0), "null or a number of seconds > 0"),
        **FRONT_PLACEMENT_CHECKS,
    }
    for key, value in h.items():
        ok, allowed = checks[key]
        _need(f"http.{key}", value, ok(value), allowed)
    out = HttpSettings(**_float_resources(h))
    if out.enabled:
        _need("http.host", out.host, out.host in LOOPBACK_HOSTS or gateway.tls or gateway.insecure_remote,
              f"a loopback address ({', '.join(LOOPBACK_HOSTS[:3])}) without TLS: set gateway.tls_cert_file and "
              "tls_key_file (the HTTP proxy serves HTTPS with them), or gateway.insecure_remote: true")
        _need("gateway.tls_client_ca_file", gateway.tls_client_ca_file, gateway.tls_client_ca_file is None,
              "null while http.enabled: Ray Serve's HTTP proxy cannot require client certificates (it does not "
              "expose uvicorn's ssl_cert_reqs); set http.enabled: false to keep mTLS on gRPC only")
    return out


def _units(raw) -> Units:
    u = _section(raw, "units", {"min", "max", "initial"})
    lo, hi = u.get("min", 1), u.get("max", max(1, u.get("min", 1)))
    _need("units.min", lo, is_int(lo) and 0 <= lo <= 1000, "an integer in 0..1000")
    _need("units.max", hi, is_int(hi) and max(1, lo) <= hi <= 1000, f"an integer in {max(1, lo)}..1000")
    init = u.get("initial")
    _need("units.initial", init, init is None or (is_int(init) and lo <= init <= hi), f"null or {lo}..{hi}")
    return Units(lo, hi, init)


def _profile_ranks(profile: str, experts: int) -> None:
    if profile == "replicated":
        _need("expert_ranks", experts, experts == 0, "0 with profile replicated (experts live in each rank)")
    else:
        _need("expert_ranks", experts, experts >= 1,
              f">= 1 with profile {profile} (the routed experts live on expert ranks)")


def _expert_map(raw, experts: int) -> dict[int, list[int]]:
    if isinstance(raw, dict):  # keys may come as strings from JSON or a Helm-rendered file: "0" is rank 0
        raw = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in raw.items()}
    _need("expert_map", raw, isinstance(raw, dict) and sorted(raw) == list(range(experts)) and experts > 0,
          f"a mapping with one key per expert rank 0..{experts - 1} (expert_ranks: {experts})")
    for rank, ids in raw.items():
        _need(f"expert_map.{rank}", ids, isinstance(ids, list) and ids != [] and all(
            is_int(e) and e >= 0 for e in ids), "a non-empty list of expert ids")
    return {int(rank): [int(e) for e in ids] for rank, ids in raw.items()}


def _resources(raw) -> dict[str, RankResources]:
    r = _section(raw, "resources", {"attention", "experts"})
    out = {}
    for role in ("attention", "experts"):
        sec = _section(r.get(role), f"resources.{role}", {"cpus", "gpus"})
        cpus, gpus = sec.get("cpus", 1.0), sec.get("gpus", 0.0)
        _need(f"resources.{role}.cpus", cpus, is_number(cpus) and 0 < cpus <= 512, "a number in (0, 512]")
        _need(f"resources.{role}.gpus", gpus, is_number(gpus) and 0 <= gpus <= 16, "a number in 0..16")
        out[role] = RankResources(float(cpus), float(gpus))
    return out


def _labels(raw) -> dict[str, dict[str, str]]:
    r = _section(raw, "node_labels", {"attention", "experts"})
    out = {}
    for role in ("attention", "experts"):
        sec = r.get(role) or {}
        _need(f"node_labels.{role}", sec, isinstance(sec, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in sec.items()), "a mapping of strings to strings")
        out[role] = dict(sec)
    return out


def _serve(raw) -> ServeSettings:
    s = _section(raw, "serve", {f.name for f in fields(ServeSettings)})
    kw = {}
    for key, value in s.items():
        if key in ("max_ongoing_requests", "max_queued_requests"):
            _need(f"serve.{key}", value, value is None or (is_int(value) and 1 <= value <= 1_000_000),
                  "null or an integer in 1..1000000")
        elif key in ("target_ongoing_requests", "graceful_shutdown_timeout_s"):
            _need(f"serve.{key}", value, value is None or (is_number(value) and value > 0), "null or a number > 0")
        else:
            _need(f"serve.{key}", value, is_number(value) and value >= (0 if "delay" in key else 0.01),
                  "a number of seconds >= 0" if "delay" in key else "a number of seconds > 0")
        kw[key] = value
    out = ServeSettings(**kw)
    if out.graceful_shutdown_timeout_s is not None:
        _need("serve.graceful_shutdown_timeout_s", out.graceful_shutdown_timeout_s,
              out.graceful_shutdown_timeout_s >= out.max_request_s,
              f">= serve.max_request_s ({out.max_request_s}): a drain must let the longest request finish")
    return out


def load_topology(path: str | Path) -> Topology:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError("config", str(p), f"a readable YAML file ({e.strerror})", "topology") from e
    except yaml.YAMLError as e:
        raise ConfigError("config", str(p), f"valid YAML ({e})", "topology") from e
    return parse_topology(raw)


def topology_from_dict(d: dict) -> Topology:
    """Rebuild from `Topology.to_dict()` (inside replicas and rank actors)."""
    return parse_topology(d)
