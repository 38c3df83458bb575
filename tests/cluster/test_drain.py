"""A pod's preStop drain (cluster/drain.py, `dgserve drain-pod`): the gateway drains when its file appears and
reports; the hook waits for the report, asks Ray to drain the node and waits for its Serve replicas to leave, and
never outlives its grace period."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from dgserve.cluster.cli import main
from dgserve.cluster.drain import done_path, drain_pod, ray_drain_command, request, watch


def test_the_gateway_drains_when_the_file_appears_and_reports_what_failed(tmp_path):
    path = tmp_path / "drain"
    calls = []

    async def drain():
        calls.append(time.monotonic())
        return {"failed": ["r7"]}

    async def scenario():
        task = asyncio.create_task(watch(path, drain, period_s=0.01))
        await asyncio.sleep(0.1)
        assert not calls and not task.done()  # no file: no drain
        report = await asyncio.to_thread(request, path, 5.0, ("gateway",), 0.01)
        return await task, report

    left, report = asyncio.run(scenario())
    assert len(calls) == 1 and left == {"failed": ["r7"]} and report == {"gateway": {"failed": ["r7"]}}
    assert json.loads(done_path(path).read_text()) == {"failed": ["r7"]}


def test_the_hook_waits_for_every_front_it_names(tmp_path):
    path = tmp_path / "drain"

    async def scenario():
        fronts = [asyncio.create_task(watch(path, drain, front, period_s=0.01)) for front, drain in (
            ("gateway", lambda: asyncio.sleep(0, {"failed": []})),
            ("http", lambda: asyncio.sleep(0.3, {"failed": ["h1"]})))]  # the HTTP API finishes later
        report = await asyncio.to_thread(request, path, 5.0, ("gateway", "http"), 0.01)
        await asyncio.gather(*fronts)
        return report

    assert asyncio.run(scenario()) == {"gateway": {"failed": []}, "http": {"failed": ["h1"]}}


def test_a_stale_report_is_not_taken_and_no_gateway_means_no_report_within_the_grace(tmp_path):
    path = tmp_path / "sub" / "drain"
    path.parent.mkdir()
    done_path(path).write_text('{"failed": []}')  # from an earlier drain
    t0 = time.monotonic()
    assert request(path, 0.3, ("gateway",), 0.01) == {"gateway": None} and path.exists()
    assert 0.3 <= time.monotonic() - t0 < 2


def test_the_hook_drains_the_ray_node_then_waits_for_its_replicas_to_leave(tmp_path):
    ran, left = [], iter([2, 1, 0])
    lines = drain_pod(30, None, True, run=lambda cmd, t: ran.append((cmd, t)) or 0, node_id=lambda: "n1",
                      replicas_here=lambda t: next(left), period_s=0.01)
    assert [c for c, _ in ran] == [ray_drain_command(30, "n1")] and 29 < ran[0][1] <= 30
    assert ran[0][0][:4] == ["ray", "drain-node", "--node-id", "n1"] and "--deadline-remaining-seconds" in ran[0][0]
    assert lines == ["ray: this node's Serve replicas moved away"]
    t0 = time.monotonic()
    lines = drain_pod(0.2, None, True, run=lambda cmd, t: 0, node_id=lambda: "n1", replicas_here=lambda t: 3,
                      period_s=0.01)
    assert lines == ["ray: Serve replicas still here at the deadline: 3"] and time.monotonic() - t0 < 2


def test_the_hook_never_raises_and_keeps_to_its_grace_period(tmp_path):
    def no_ray():
        raise ConnectionError("no Ray at auto")

    assert drain_pod(5, None, True, run=lambda cmd, t: 0, node_id=no_ray) == [
        "ray drain-node failed (ConnectionError: no Ray at auto); the node's replicas stop with the pod"]
    assert drain_pod(5, None, True, run=lambda cmd, t: 1, node_id=lambda: "n1") == [
        "ray drain-node failed (exit 1); the node's replicas stop with the pod"]

    def slow(timeout_s):  # a state query that takes all the time it is given, then fails
        time.sleep(min(timeout_s, 0.3))
        raise TimeoutError

    t0 = time.monotonic()
    lines = drain_pod(0.3, str(tmp_path / "drain"), True, run=lambda cmd, t: 0, node_id=lambda: "n1",
                      replicas_here=slow, period_s=0.01)
    assert lines == ["ray: Serve replicas still here at the deadline: unknown (TimeoutError)",
                     "gateway: no drain report (none on this pod, or it did not finish)"]
    assert time.monotonic() - t0 < 1.5


def test_a_missing_or_hung_command_is_a_failed_exit_not_an_exception():
    from dgserve.cluster.drain import _run

    assert _run(["/nonexistent/ray"], 5) == -1
    t0 = time.monotonic()
    assert _run(["sleep", "10"], 0.1) == -1 and time.monotonic() - t0 < 3


def test_the_cli_hook_waits_for_the_gateway_report(tmp_path, capsys):
    path = tmp_path / "drain"

    def gateway():
        while not path.exists():
            time.sleep(0.01)
        part = tmp_path / "report.part"
        part.write_text('{"failed": ["a", "b"]}')
        part.replace(done_path(path))

    threading.Thread(target=gateway, daemon=True).start()
    assert main(["drain-pod", "--grace", "5", "--gateway-file", str(path)]) == 0
    assert "gateway drained: 2 request(s) failed" in capsys.readouterr().out
    assert main(["drain-pod", "--grace", "0.2", "--gateway-file", str(path), "--front", "gateway",
                 "--front", "http"]) == 0  # a second drain: the gateway's report is from the first, so waited for
    out = capsys.readouterr().out
    assert "gateway: no drain report" in out and "http: no drain report" in out
