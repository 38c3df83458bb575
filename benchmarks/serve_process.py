"""`dgserve serve` as a subprocess, and the processes of its local Ray cluster: what load.py starts, watches and
SIGKILLs (and what tests/cluster/test_serve.py runs as a user would).

Kill targets are found among the server's descendants (PPid in /proc) by Ray's process titles: `ray::RankActor`,
`ray::ServeReplica:<app>:EngineUnit`, `ray::ServeReplica:<app>:Gateway`. Rank 0 serves its group's TCP store, so its
process has a `pt_tcpstore_uv` thread; a rank without one is a follower.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

KILL_TARGETS = ("rank", "unit", "gateway")
STOP_WAIT_S = 90.0
RANK_TITLE = "ray::RankActor"
# "ray::ServeReplica:<app>:EngineUnit[.method]"; while starting: "ray::SERVE_REPLICA::...:ServeReplica:<app>:..."
UNIT_TITLE = re.compile(r"^ray::.*\bServeReplica:[^:\s]+:EngineUnit\b")
GATEWAY_TITLE = re.compile(r"^ray::.*\bServeReplica:[^:\s]+:Gateway\b")
STORE_THREAD = "pt_tcpstore_uv"  # the TCP store's server loop: only in rank 0, which hosts the store


# ----------------------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    cmdline: str
    start: int = 0  # start time (clock ticks after boot: /proc/<pid>/stat field 22)
    threads: tuple[str, ...] = ()  # thread names (read for rank actors only)


def descendants(procs: Iterable[Proc], root: int) -> list[Proc]:
    """The processes below `root` (children, their children, ...), by pid."""
    children: dict[int, list[Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    out, todo = [], [root]
    while todo:
        for p in children.get(todo.pop(), []):
            out.append(p)
            todo.append(p.pid)
    return sorted(out, key=lambda p: p.pid)


def _newest(procs: Sequence[Proc]) -> Proc:
    return max(procs, key=lambda p: (p.start, p.pid))


def kill_target(procs: Sequence[Proc], target: str) -> tuple[Proc | None, str]:
    """The process to SIGKILL for `target` (rank | unit | gateway) among the server's processes, and what it is.
    rank: the newest rank actor without the TCP store thread (a non-zero rank) when a rank with it (rank 0) is
    seen too; otherwise the newest rank actor, rank unknown. unit, gateway: the newest such Serve replica."""
    if target == "rank":
        ranks = [p for p in procs if p.cmdline.startswith(RANK_TITLE)]
        if not ranks:
            return None, "no rank actor process"
        followers = [p for p in ranks if STORE_THREAD not in p.threads]
        if followers and len(followers) < len(ranks):
            return _newest(followers), "a non-zero rank (no TCP store thread)"
        return _newest(ranks), "rank unknown (rank 0's TCP store thread not told apart)"
    titles = {"unit": UNIT_TITLE, "gateway": GATEWAY_TITLE}
    if target not in titles:
        raise ValueError(f"target {target!r} is not one of {KILL_TARGETS}")
    found = [p for p in procs if titles[target].match(p.cmdline)]
    if not found:
        return None, f"no {target} Serve replica process"
    return _newest(found), f"the {'engine unit' if target == 'unit' else 'gateway'}'s Serve replica"


def _read_proc(pid_dir: Path) -> Proc | None:
    try:
        cmd = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        stat = (pid_dir / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3
    threads: tuple[str, ...] = ()
    if cmd.startswith(RANK_TITLE):
        with contextlib.suppress(OSError):
            threads = tuple(sorted((t / "comm").read_text().strip() for t in (pid_dir / "task").iterdir()))
    return Proc(int(pid_dir.name), int(fields[1]), cmd, int(fields[19]), threads)


def process_table() -> list[Proc]:
    """Every process of this machine (those that vanish while read are left out)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (p := _read_proc(d)) is not None:
            out.append(p)
    return out


def leftovers(marker: str) -> list[int]:
    """Pids of processes (not this one) whose command line mentions `marker`: the Ray temp folder of one run."""
    return [p.pid for p in process_table() if marker in p.cmdline and p.pid != os.getpid()]


# ----------------------------------------------------------------------------------------------- the server


class ServerError(RuntimeError):
    pass


class Output:
    """A process's merged stdout and stderr, read on a thread: every line kept in order (`output`) and each one
    waited for at most once (`wait_for`)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.output: list[str] = []
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float) -> str:
        """The next line that contains `text` (with its newline); ServerError after `timeout` or at the end."""
        t0, seen = time.monotonic(), []
        while time.monotonic() - t0 < timeout:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            seen.append(line)
            if text in line:
                return line
        raise ServerError(f"{text!r} not printed within {timeout:.0f} s; the last lines:\n" + "".join(seen[-30:]))


class Server:
    """`dgserve serve` in its own process group, its output read on a thread."""

    def __init__(self, topology: dict, workdir: Path, keep_logs: Path | None = None):
        from dgserve.cluster.api import free_port

        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp = f"/tmp/dgray-load-{uuid.uuid4().hex[:8]}"
        self.config = workdir / "topology.json"  # JSON is YAML
        self.config.write_text(json.dumps(topology))
        self.out: Output | None = None
        self.proc: subprocess.Popen | None = None
        self.keep_logs = keep_logs  # where the serve output and Ray's session logs are copied on stop

    def start(self, timeout: float) -> str:
        """Starts the server; returns its "dgserve is serving" line."""
        cmd = [sys.executable, "-m", "dgserve.cluster.cli", "serve", "--port", str(self.port), "--temp-dir",
               self.temp, "--metrics-port", "0", "--config", str(self.config)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.out = Output(self.proc)
        return self.out.wait_for("dgserve is serving", timeout).rstrip("\n")

    @property
    def output(self) -> list[str]:
        return self.out.output if self.out is not None else []

    def processes(self) -> list[Proc]:
        return descendants(process_table(), self.proc.pid)

    def stop(self) -> dict:
        """SIGINT, then SIGKILL of the process group after STOP_WAIT_S; then kills what is left of this run."""
        out = {"rc": None, "forced": False, "leftovers_killed": []}
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
            try:
                out["rc"] = self.proc.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                out["forced"] = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                out["rc"] = self.proc.wait(30)
        time.sleep(1)
        if self.keep_logs is not None:
            self.keep_logs.mkdir(parents=True, exist_ok=True)
            (self.keep_logs / "serve.log").write_text("".join(self.output))
            sessions = [*Path(self.temp).glob("session_*"), *Path(self.temp).glob("ray/session_*")]  # ray/: ours
            for logs in (d / "logs" for d in sessions if not d.is_symlink()):
                shutil.copytree(logs, self.keep_logs / "ray-logs", dirs_exist_ok=True, ignore_dangling_symlinks=True)
        for pid in leftovers(self.temp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                out["leftovers_killed"].append(pid)
        shutil.rmtree(self.temp, ignore_errors=True)
        return out
