"""Closed by default for Ray: a local cluster on loopback only, its files for their owner only, and Ray's token
authentication for a cluster that is joined.

What Ray 2.60 does (read in its source, measured with the socket table; see docs/design.md):
- Every server of a node binds loopback when the node address is a loopback address, and all interfaces (or the
  node address) otherwise: GCS, raylet, core workers (C++), dashboard agent gRPC (`dashboard/agent.py`) and HTTP
  (`dashboard/http_server_agent.py`), runtime-env agent, metrics exporter (`reporter_agent.py`), autoscaler and
  dashboard metrics (`monitor.py`, `dashboard/head.py`). So the node address 127.0.0.1 closes them all.
- But `resolve_ip_for_localhost` (`_private/services.py`) swaps a loopback address for the machine's external one
  unless `ray_constants.ENABLE_RAY_CLUSTER` is off, and that constant is read from the environment once, at
  `import ray`: `loopback_node` sets it for the `ray.init` call.
- Token auth: the mode is `RAY_AUTH_MODE` (token | disabled), read from the environment by each process; the token
  comes from `RAY_AUTH_TOKEN`, else the file `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token` (C++
  AuthenticationTokenLoader). A driver without the token is refused by a token cluster (AuthenticationError); a
  driver with a token joins a cluster without auth silently, hence `gcs_requires_token`.
- Except Serve's replica gRPC server, bound to `[::]` whatever the node address: see `loopback_worker`.
- Ray makes its temp, session, logs and sockets folders mode 0777 (`ray._common.utils.try_make_directory_shared`),
  in every worker it starts; it writes its files with the process umask. See `private_temp_dir`, `private_umask`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from dgserve.model.errors import InputError

log = logging.getLogger("dgserve.security")

LOOPBACK = "127.0.0.1"
TOKEN_ENV, TOKEN_PATH_ENV, MODE_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"


def address_host(address: str) -> str:
    """The host of `host:port`, `[v6]:port` or `ray://host:port`."""
    rest = address.split("://", 1)[-1]
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    return rest.rsplit(":", 1)[0] if rest.count(":") == 1 else rest


@contextlib.contextmanager
def loopback_node() -> Iterator[None]:
    """Keep a loopback address as it is during `ray.init` (see the module's note); restored after, so a later
    join of a remote cluster in this process is not pinned to loopback."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def loopback_worker() -> None:
    """Ray's worker setup hook on a local cluster (runs in every worker before its task or actor). Serve 2.60 binds
    each replica's inter-deployment gRPC server to every interface, with no option to change it
    (`serve/_private/replica.py`: `add_port_to_grpc_server(self._server, "[::]:0")`), and that server unpickles
    what it receives; with auth off, anyone on the network could run code in a replica. Bind it to loopback:
    the replica's node address on a local cluster, where its callers are."""
    from ray._common import tls_utils

    add = tls_utils.add_port_to_grpc_server

    def add_on_loopback(server, address: str):
        host, _, port = address.rpartition(":")
        return add(server, f"{LOOPBACK}:{port}" if host in ("[::]", "0.0.0.0", "") else address)

    tls_utils.add_port_to_grpc_server = add_on_loopback


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Umask 077 while Ray starts: its processes inherit it (GCS, raylet, agents, and the workers the raylet forks
    later), so the files they write (logs, port files, sockets) are for their owner only."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def private_temp_dir(path: str | Path) -> Path:
    """Ray's temp folder inside `path`, a folder of this user's only (0700), made or checked here; a link or a
    folder of another user is refused (they could read our logs or swap our sockets). Ray chmods its temp, session,
    logs and sockets folders 0777, again in every worker it starts (`try_make_directory_shared` in
    `ray/_common/utils.py`, through `Node.__init__`), so they cannot be kept closed; the folder around them can."""
    folder = Path(path)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = folder.lstat()
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid():
        raise InputError("--temp-dir", f"{folder} is a link or belongs to another user; give a folder of your own")
    os.chmod(folder, 0o700)  # a folder an earlier Ray left open
    return folder / "ray"


def configure_token(token_file: str | Path | None) -> bool:
    """Use Ray's token authentication in this process (and the Ray processes it starts) when a token is given:
    `token_file` (--ray-token-file: a Kubernetes Secret mounted as a file), else a token Ray already has in the
    environment (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`). Ray itself turns token mode on for an explicit address
    only through RAY_AUTH_MODE, so it is set here. Returns whether token auth is on."""
    if token_file is not None:
        path = Path(token_file).expanduser().absolute()
        _check_token_file(path, "--ray-token-file")
        os.environ[TOKEN_PATH_ENV] = str(path)
        os.environ.pop(TOKEN_ENV, None)  # it would win over the file (Ray's loader reads it first)
        os.environ[MODE_ENV] = "token"
    elif os.environ.get(TOKEN_ENV) or os.environ.get(TOKEN_PATH_ENV):
        if not os.environ.get(TOKEN_ENV):
            _check_token_file(Path(os.environ[TOKEN_PATH_ENV]), TOKEN_PATH_ENV)
        os.environ.setdefault(MODE_ENV, "token")  # an explicit RAY_AUTH_MODE wins
    else:
        return os.environ.get(MODE_ENV, "").lower() == "token"
    _refresh_ray_auth()
    return os.environ[MODE_ENV].lower() == "token"


def _check_token_file(path: Path, name: str) -> None:
    """A missing or empty token file is a clear error here; in Ray it is a RAY_CHECK that aborts the process."""
    try:
        ok = bool(path.read_text().strip())
    except OSError as e:
        raise InputError(name, f"cannot read the Ray token file {path}: {e.strerror}") from e
    if not ok:
        raise InputError(name, f"the Ray token file {path} is empty")


def _refresh_ray_auth() -> None:
    """Ray caches the auth mode (RayConfig) and the token: reload both, as Ray's own `_enable_token_auth` does."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def gcs_requires_token(gcs_address: str, timeout_s: float = 5.0) -> bool | None:
    """Ask the cluster's GCS for its id without a token: refused (UNAUTHENTICATED) -> True, answered -> False,
    anything else (unreachable, TLS) -> None. Independent of this process's own auth mode."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(gcs_address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)
        except grpc.RpcError as e:
            return True if e.code() == grpc.StatusCode.UNAUTHENTICATED else None
    return False


def cluster_requires_token() -> bool | None:
    """Whether the cluster this driver joined refuses callers without the token. When the GCS cannot be asked
    (a Ray Client address), a driver that joined with auth disabled proves the cluster has none: a token cluster
    refuses such a driver."""
    import ray
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    with contextlib.suppress(Exception):
        found = gcs_requires_token(ray.get_runtime_context().gcs_address)
        if found is not None:
            return found
    return None if is_token_auth_enabled() else False


def warn_if_open(address: str) -> bool:
    """Warn (log, stderr) when the joined cluster has no token authentication. Returns whether it warned."""
    if cluster_requires_token() is not False:
        return False
    log.warning("the Ray cluster at %s does not require a token (Ray token authentication is off): anyone who can "
                "reach its ports can run code on it. Start it with RAY_AUTH_MODE=token and give dgserve the token "
                "(--ray-token-file or RAY_AUTH_TOKEN_PATH).", address)
    return True
