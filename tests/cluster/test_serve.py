"""The main job as a user runs it: `dgserve serve`, a client against it, then Ctrl-C / SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from benchmarks.serve_process import Output
from dgserve.cluster.api import free_port
from dgserve_client import Client, Unavailable


def leftovers(marker: str) -> list[str]:
    """Processes whose command line mentions `marker` (the Ray temp folder of one server)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            out.append(f"{p.name}: {cmd[:120]}")
    return out


class Server:
    def __init__(self, tmp_path: Path, *extra: str):
        self.port, self.metrics_port, self.http_port = free_port(), free_port(), free_port()
        self.temp = f"/tmp/dgray-{uuid.uuid4().hex[:8]}"
        env = {**os.environ, "DGSERVE_HOME": str(tmp_path / "home")}
        self.env = env
        cmd = [sys.executable, "-m", "dgserve.cluster.cli", "serve", "--port", str(self.port), "--temp-dir", self.temp,
               "--metrics-port", str(self.metrics_port), "--http-port", str(self.http_port), *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.out = Output(self.proc)
        self.output = self.out.output  # every line, stdout and stderr, in order
        self.wait_for = self.out.wait_for
        self.address = f"127.0.0.1:{self.port}"

    def stop(self, sig) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(90)
        self.out.reader.join(10)  # the output to its end
        return rc


def assert_no_ray_shutdown_lines(output: list[str]) -> None:
    """Serve's shutdown used to print "(raylet) Task ServeController.listen_for_change failed ... killed by
    `ray.kill`" (one line per call the driver still had pending on the controller it killed)."""
    out = "".join(output)
    for text in ("ray.kill", "listen_for_change", "Traceback", "(raylet)"):
        assert text not in out, f"{text!r} in the output:\n{out}"


def assert_clean_stop(output: list[str], *allowed: str) -> None:
    """From the stop on, the output of `dgserve serve` on its own local cluster is its own lines only (and those
    starting with one of `allowed`): nothing from Ray, and no traceback anywhere."""
    assert_no_ray_shutdown_lines(output)
    start = next(i for i, line in enumerate(output) if line.startswith("stopping: "))
    own = ("stopping: draining in-flight requests ...", "stopped")
    stray = [line for line in output[start:]
             if line.rstrip("\n") not in own and not (allowed and line.startswith(allowed))]
    assert stray == [], f"lines not from dgserve after the stop:\n{''.join(stray)}"


def test_make_serve_main_job_then_ctrl_c_leaves_nothing(tmp_path):
    srv = Server(tmp_path)
    try:
        line = srv.wait_for("dgserve is serving", 180)
        assert srv.address in line and "random weights" in line
        srv.wait_for("dgserve-client --target", 5)
        http_line = srv.wait_for("OpenAI-compatible HTTP API on", 5)
        srv.wait_for(f"http://127.0.0.1:{srv.metrics_port}/metrics", 5)
        with Client(srv.address) as c:
            assert c.health() == "SERVING"
            r = c.generate(prompt="Hello world", seed=3, max_new_tokens=40, max_denoising_steps=6)
        import urllib.request

        t0, text = time.monotonic(), ""
        while "ray_dgserve_step_seconds" not in text and time.monotonic() - t0 < 30:
            text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=5).read().decode()
            time.sleep(0.5)
        assert "ray_dgserve_step_seconds" in text
        one = subprocess.run([sys.executable, "-m", "dgserve.cluster.cli", "generate", "--prompt", "Hello world",
                              "--seed", "3", "--max-new-tokens", "40", "--max-denoising-steps", "6", "--json"],
                             capture_output=True, text=True, env=srv.env, timeout=120)
        assert json.loads(one.stdout.strip().splitlines()[-1])["token_ids"] == list(r.token_ids)
        # the OpenAI-compatible HTTP API, at the address it printed, on Serve's proxy
        base = http_line.split(" on ", 1)[1].split()[0]
        assert base == f"http://127.0.0.1:{srv.http_port}/v1"
        models = json.loads(urllib.request.urlopen(f"{base}/models", timeout=10).read())
        assert models["data"][0]["id"] == "dgserve/tiny"
    finally:
        rc = srv.stop(signal.SIGINT)
    assert rc == 0
    assert_clean_stop(srv.output)
    time.sleep(1)
    assert leftovers(srv.temp) == []


@pytest.mark.slow  # ~45 s
def test_sigterm_drains_in_flight_requests_and_fails_the_rest_as_unavailable(tmp_path):
    cfg = tmp_path / "topology.yaml"
    cfg.write_text("gateway: {grace_s: 3}\nserve: {max_request_s: 60}\n")
    srv = Server(tmp_path, "--config", str(cfg), "--no-http")  # gRPC only: the HTTP drain is in test_http
    results: dict = {}
    try:
        srv.wait_for("dgserve is serving", 180)

        def long_request():
            with Client(srv.address, retries=0) as c:
                try:
                    for _ in c.generate_stream(token_ids=[5, 6, 7], max_new_tokens=32 * 200, max_denoising_steps=48,
                                               stream_drafts=True):
                        results.setdefault("started", time.monotonic())
                    results["long"] = "finished"
                except Exception as e:
                    results["long"] = e

        def short_request():
            with Client(srv.address, retries=0) as c:
                # one block of 8 steps: done well within the grace period even beside the long request on a busy
                # 2-core machine (48 steps took more than 3 s there)
                results["short"] = c.generate(token_ids=[5, 6], max_new_tokens=32, max_denoising_steps=8)

        t_long = threading.Thread(target=long_request)
        t_long.start()
        t0 = time.monotonic()
        while "started" not in results and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        t_short = threading.Thread(target=short_request)
        t_short.start()
        time.sleep(0.05)
    finally:
        rc = srv.stop(signal.SIGTERM)
    t_long.join(60)
    t_short.join(60)
    assert rc == 0
    assert isinstance(results["long"], Unavailable), results["long"]  # past the grace period: retriable
    assert len(results["short"].token_ids) == 32  # finished within the grace period
    srv.wait_for("did not finish within the grace period", 5)
    assert_clean_stop(srv.output, "1 request(s) did not finish within the grace period")
    time.sleep(1)
    assert leftovers(srv.temp) == []


@pytest.mark.parametrize(("args", "message"), [
    (["--config", "/nonexistent.yaml"], "invalid config='/nonexistent.yaml'; allowed: a readable YAML file"),
    (["--port", "70000"], "invalid gateway.port=70000; allowed: an integer in 0..65535"),
], ids=["missing-config", "port-out-of-range"])
def test_serve_bad_arguments_are_clear_errors(args, message):
    r = subprocess.run([sys.executable, "-m", "dgserve.cluster.cli", "serve", *args], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert message in r.stderr, r.stderr


@pytest.mark.slow  # ~50 s
def test_serve_joins_an_existing_ray_cluster_and_leaves_it_running(tmp_path):
    """... with the gateway behind TLS and API keys (`--tls-cert/--tls-key`, `--api-keys-file`), and a warning that
    the joined cluster does not require Ray's token."""
    from dgserve_client import TLS, Unauthenticated
    from tests.certs import make_certs

    certs = make_certs(tmp_path / "certs")
    (tmp_path / "keys").write_text("serve-key\n")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "DGSERVE_HOME": str(tmp_path / "home")}
    ray_bin = str(Path(sys.executable).parent / "ray")
    gcs, temp = free_port(), f"/tmp/dgray-{uuid.uuid4().hex[:8]}"
    head = subprocess.run([ray_bin, "start", "--head", f"--port={gcs}", "--num-cpus=8", "--include-dashboard=false",
                           f"--temp-dir={temp}", "--disable-usage-stats"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert head.returncode == 0, head.stderr
    try:
        port, http_port = free_port(), free_port()
        proc = subprocess.Popen([sys.executable, "-m", "dgserve.cluster.cli", "serve", "--address",
                                 f"127.0.0.1:{gcs}", "--port", str(port), "--http-port", str(http_port),
                                 "--tls-cert", certs.server_cert,
                                 "--tls-key", certs.server_key, "--api-keys-file", str(tmp_path / "keys")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        out = []
        for line in proc.stdout:
            out.append(line)
            if "Ctrl-C stops it" in line:
                break
        assert any("dgserve is serving" in line for line in out), "".join(out[-20:])
        assert any("does not require a token" in line for line in out), "".join(out[-20:])
        assert any("--tls-ca CA.pem --api-key-file KEY_FILE generate" in line for line in out), "".join(out[-20:])
        tls = TLS(ca_file=certs.ca)
        with Client(f"localhost:{port}", tls=tls, api_key="serve-key") as c:
            assert len(c.generate(token_ids=[5, 6], max_new_tokens=32, max_denoising_steps=2).token_ids) == 32
        with Client(f"localhost:{port}", tls=tls, api_key="", retries=0) as c, pytest.raises(Unauthenticated):
            c.generate(token_ids=[5, 6], max_new_tokens=32, max_denoising_steps=2)
        # the HTTP API on Serve's proxy: HTTPS with the gateway's certificate, the gateway's API keys
        line = next(x for x in out if "OpenAI-compatible HTTP API on" in x)
        base = line.split(" on ", 1)[1].split()[0].replace("127.0.0.1", "localhost")
        assert base == f"https://localhost:{http_port}/v1"
        https = ssl.create_default_context(cafile=certs.ca)
        models = urllib.request.Request(f"{base}/models", headers={"Authorization": "Bearer serve-key"})
        assert json.loads(urllib.request.urlopen(models, context=https, timeout=10).read())["data"][0]["id"]
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/models", context=https, timeout=10)
        assert refused.value.code == 401
        with pytest.raises(OSError):  # plaintext to the HTTPS port gets no answer
            urllib.request.urlopen(f"http://localhost:{http_port}/v1/models", timeout=10)
        proc.send_signal(signal.SIGINT)
        out += proc.stdout.readlines()
        assert proc.wait(90) == 0
        # A joined cluster forwards its workers' logs to the driver (log_to_driver), so only Ray's shutdown lines
        # are checked here.
        assert_no_ray_shutdown_lines(out)
        status = subprocess.run([ray_bin, "status", f"--address=127.0.0.1:{gcs}"], capture_output=True, text=True,
                                env=env, timeout=60)
        assert status.returncode == 0  # the cluster we joined is still there
    finally:  # stop only this head (`ray stop` would also stop the test session's own cluster)
        for entry in leftovers(temp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.split(":")[0]), signal.SIGKILL)
