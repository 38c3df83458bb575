"""Closed by default: the local cluster listens on loopback only and keeps its files to its owner; a cluster with
Ray's token authentication refuses a driver without the token, and joining one without it is warned about.

Only the socket table is read and only loopback is connected to: nothing here sends traffic to another address
(drivers get RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, without which Ray turns 127.0.0.1 into the machine's address).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from dgserve.cluster import ray_security
from dgserve.cluster.api import free_port
from dgserve.model.errors import InputError


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(p.name))
    out, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _address(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)  # the kernel prints each 32-bit word in host (little-endian) order
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def listening(pids: set[int]) -> list[tuple[int, str, str, int]]:
    """(pid, process, address, port) of every listening TCP socket of these processes, from /proc."""
    owner: dict[str, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(fd.path)
                    if target.startswith("socket:["):
                        owner[target[8:-1]] = pid
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in owner:  # LISTEN
                host, port = f[1].split(":")
                pid = owner[f[9]]
                name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                out.append((pid, os.path.basename(name), _address(host), int(port, 16)))
    return out


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1: an IPv6 socket bound to IPv4 loopback
    return (mapped or ip).is_loopback


def test_every_port_of_the_local_cluster_listens_on_loopback_only(deploy):
    """GCS, raylet, agents, metrics, Serve's controller and replicas, core workers, and two rank actors with their
    TCP store and gloo pairs: all on 127.0.0.1 (or ::1). The old start listened on the machine's address and *."""
    deploy(attention_ranks=2)
    sockets = listening(descendants(os.getpid()))
    names = {name.split(".")[0] for _, name, _, _ in sockets}  # ray::RankActor.generate while a call runs
    assert {"gcs_server", "raylet", "ray::RankActor"} <= names, sockets  # the cluster's processes were seen
    open_ = [s for s in sockets if not is_loopback(s[2])]
    assert not open_, "listening on a non-loopback address:\n" + "\n".join(map(str, open_))


def test_the_temp_folder_and_the_logs_are_for_their_owner_only(ray_cluster):
    """The folder dgserve names is 0700 (Ray chmods the folders inside it 0777, in every worker it starts), and
    every file of this session (logs, port files, sockets) has no group or other bits (umask 077)."""
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    outer = session.parent.parent  # <temp-dir>/ray/session_...
    st = outer.stat()
    assert st.st_uid == os.getuid() and st.st_mode & 0o077 == 0, oct(st.st_mode)
    files = [p for p in session.rglob("*") if not p.is_dir() and not p.is_symlink()]
    assert any(p.name.startswith("raylet") for p in files) and len(files) > 10
    open_ = [f"{oct(p.lstat().st_mode)} {p}" for p in files if p.lstat().st_mode & 0o077]
    assert not open_, "\n".join(open_)


def test_a_temp_folder_of_someone_else_or_a_link_is_refused(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(InputError, match="link or belongs to another user"):
        ray_security.private_temp_dir(tmp_path / "link")
    open_folder = tmp_path / "open"
    open_folder.mkdir(mode=0o777)
    os.chmod(open_folder, 0o777)
    assert ray_security.private_temp_dir(open_folder) == open_folder / "ray"
    assert open_folder.stat().st_mode & 0o777 == 0o700


def test_the_session_cluster_has_no_token_auth_and_joining_it_warns(ray_cluster, caplog):
    """The detection asks the GCS for its id without a token; joining (api.connect) warns on stderr/log."""
    import ray

    assert ray_security.gcs_requires_token(ray.get_runtime_context().gcs_address) is False
    with caplog.at_level(logging.WARNING, logger="dgserve.security"):
        ray_cluster.connect("auto")  # already connected: only the check and serve.start run
    assert "does not require a token" in caplog.text and "--ray-token-file" in caplog.text


def test_a_bad_token_file_is_a_clear_error_before_anything_changes(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    mode = os.environ.get("RAY_AUTH_MODE")
    with pytest.raises(InputError, match="cannot read the Ray token file"):
        ray_security.configure_token(tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(InputError, match="is empty"):
        ray_security.configure_token(tmp_path / "empty")
    assert os.environ.get("RAY_AUTH_MODE") == mode and "RAY_AUTH_TOKEN_PATH" not in os.environ


def test_serve_takes_a_ray_token_file():
    from dgserve.cluster.cli import build_parser

    assert build_parser().parse_args(["serve", "--ray-token-file", "/run/secrets/ray"]).ray_token_file == \
        "/run/secrets/ray"
    assert build_parser().parse_args(["serve"]).ray_token_file is None


@pytest.mark.parametrize(("address", "host"), [("127.0.0.1:6379", "127.0.0.1"), ("ray://localhost:10001", "localhost"),
                                               ("[::1]:6379", "::1"), ("auto", "auto"), ("10.0.0.5:6379", "10.0.0.5")])
def test_address_host(address, host):
    assert ray_security.address_host(address) == host


def in_session(sid: int) -> list[int]:
    """Live processes of a session (zombies left to their reaper)."""
    out = []
    for p in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(p.name))
    return out


JOIN = textwrap.dedent("""
    import sys, ray
    from dgserve.cluster import api, ray_security
    api.connect(sys.argv[1], token_file=sys.argv[2])  # what `dgserve serve --address A --ray-token-file F` does
    print("JOINED", ray.get(ray.remote(lambda: 41 + 1).options(num_cpus=0).remote()),
          "REQUIRES", ray_security.cluster_requires_token(), "WARNED", ray_security.warn_if_open(sys.argv[1]))
    ray.shutdown()
""")


@pytest.mark.slow
def test_a_token_cluster_refuses_a_driver_without_the_token_and_takes_one_with_it(tmp_path):
    """A head started with RAY_AUTH_MODE=token (the token in a file, as a Kubernetes Secret is mounted), on
    loopback: a driver without the token is refused; `api.connect` with --ray-token-file joins, runs a task and
    does not warn; the detection says the cluster requires the token."""
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(24) + "\n")
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env |= {"HOME": str(tmp_path / "home"), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    gcs, temp = free_port(), f"/tmp/dgray-{uuid.uuid4().hex[:8]}"
    address = f"127.0.0.1:{gcs}"
    # A session of its own: its processes (the agents' command lines do not name the temp folder) are found by it.
    head = subprocess.Popen([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                             f"--ray-client-server-port={free_port()}", "--num-cpus=1", "--include-dashboard=false",
                             f"--temp-dir={temp}", "--disable-usage-stats"],
                            env=env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = head.communicate(timeout=120)
        assert head.returncode == 0, out
        assert ray_security.gcs_requires_token(address) is True
        refused = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{address}'); print('JOINED')"],
                                 env=env | {"RAY_AUTH_MODE": "disabled", "RAY_gcs_server_port_wait_time_s": "1"},
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "JOINED" not in refused.stdout
        assert "AuthenticationError" in refused.stderr and "InvalidAuthToken" in refused.stderr, refused.stderr[-2000:]
        joined = subprocess.run([sys.executable, "-c", JOIN, address, str(token)], env=env, capture_output=True,
                                text=True, timeout=120)
        assert "JOINED 42 REQUIRES True WARNED False" in joined.stdout, joined.stdout + joined.stderr[-2000:]
        assert "does not require a token" not in joined.stderr
        assert not (tmp_path / "home" / ".ray").exists()  # no token written under the home folder
    finally:  # only this head's processes: `ray stop` would stop every Ray of this machine
        for pid in in_session(head.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
    deadline = time.monotonic() + 10
    while in_session(head.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not in_session(head.pid)
