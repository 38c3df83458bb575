"""The pure parts of benchmarks/load.py: outcome classification, phase accounting (lost requests included),
percentile fields, pushback hints, arrivals, kill-target selection from fake process tables, a kill's recovery from
its health reads and probes, and the JSON shape. No server."""

from __future__ import annotations

import json
import math
import random

import grpc
import pytest

from benchmarks.load import (
    CHAOS_FACTOR,
    COUNTS,
    HEALTH_WATCH_S,
    Outcome,
    arrival_times,
    as_json,
    capacity_of,
    classify,
    completion_gap,
    failures,
    health_state,
    kill_rows,
    lost_count,
    outcome_of,
    phase_rows,
    pushback_line,
    pushback_ms,
    recovery,
    report_lines,
    summarize,
    totals,
)
from benchmarks.serve_process import KILL_TARGETS, Proc, descendants, kill_target
from dgserve_client import DeadlineExceeded, ResourceExhausted, Unavailable


def done(latency_s: float, tokens: int = 64) -> Outcome:
    return Outcome("completed", None, latency_s, tokens)


# ----------------------------------------------------------------------------------------------- outcomes


def test_classify_names_refusals_and_failures_by_grpc_code():
    assert classify(None) == ("completed", None)
    assert classify(ResourceExhausted(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")) == (
        "refused", "RESOURCE_EXHAUSTED")
    assert classify(Unavailable(grpc.StatusCode.UNAVAILABLE, "down")) == ("failed", "UNAVAILABLE")
    assert classify(DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED, "late")) == ("failed", "DEADLINE_EXCEEDED")
    assert classify(RuntimeError("not a gRPC error")) == ("failed", "RuntimeError")


class FakeRpcError(grpc.RpcError):
    def __init__(self, trailing):
        self._trailing = trailing

    def trailing_metadata(self):
        return self._trailing


def _typed_from(rpc_error: grpc.RpcError) -> ResourceExhausted:
    """What the SDK raises: its typed error, raised while handling the gRPC error (`from None`)."""
    try:
        try:
            raise rpc_error
        except grpc.RpcError:
            raise ResourceExhausted(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full") from None
    except ResourceExhausted as e:
        return e


def test_pushback_hint_read_from_an_sdk_attribute_or_the_grpc_errors_trailing_metadata():
    e = ResourceExhausted(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
    assert pushback_ms(e) is None
    e.retry_pushback_ms = 250
    assert pushback_ms(e) == 250.0
    e.retry_after_s = 0.5  # the SDK's own field (seconds)
    assert pushback_ms(e) == 500.0
    typed = _typed_from(FakeRpcError((("x-request-id", "r1"), ("grpc-retry-pushback-ms", "400"))))
    assert pushback_ms(typed) == 400.0
    assert pushback_ms(_typed_from(FakeRpcError(None))) is None
    assert pushback_ms(_typed_from(FakeRpcError((("grpc-retry-pushback-ms", "soon"),)))) is None  # malformed
    refused = outcome_of(typed, 0.003)
    assert (refused.kind, refused.code, refused.pushback_ms) == ("refused", "RESOURCE_EXHAUSTED", 400.0)


# ----------------------------------------------------------------------------------------------- accounting


def test_lost_is_what_was_sent_and_never_ended():
    assert lost_count(10, 6, 2, 1) == 1
    assert lost_count(0, 0, 0, 0) == 0
    with pytest.raises(ValueError):
        lost_count(3, 2, 1, 1)  # more ends than requests


def test_phase_accounting_with_a_lost_request():
    outcomes = [done(0.1 * (i + 1)) for i in range(10)]  # 0.1 .. 1.0 s
    outcomes += [Outcome("refused", "RESOURCE_EXHAUSTED", 0.002, 0, 100.0),
                 Outcome("refused", "RESOURCE_EXHAUSTED", 0.004, 0, None),
                 Outcome("failed", "DEADLINE_EXCEEDED", 20.0), Outcome("failed", "UNAVAILABLE", 0.5),
                 Outcome("failed", "UNAVAILABLE", 0.6)]
    s = summarize(sent=16, outcomes=outcomes, wall_s=5.0)  # one of the 16 never ended
    assert (s["sent"], s["completed"], s["refused"], s["failed"], s["lost"]) == (16, 10, 2, 3, 1)
    assert s["failed_by_code"] == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 2}
    assert set(s["failed_example"]) == {"DEADLINE_EXCEEDED", "UNAVAILABLE"}
    assert s["goodput_rps"] == pytest.approx(2.0)
    assert s["goodput_tokens_per_s"] == pytest.approx(128.0)
    # percentiles (nearest rank from below) of the completed requests only, in ms
    assert s["latency_ms_p50"] == pytest.approx(600.0)
    assert s["latency_ms_p99"] == pytest.approx(1000.0)
    assert s["refusal_ms_p50"] == pytest.approx(4.0)
    assert (s["pushback_hints"], s["pushback_ms_p50"], s["pushback_ms_seen"]) == (1, 100.0, {"100": 1})


def test_the_pushback_line_names_the_hint_values_seen():
    refusal = Outcome("refused", "RESOURCE_EXHAUSTED", 0.002, 0, 1000.0)
    s = summarize(115, [refusal] * 115, 1.0)
    assert pushback_line(s) == "grpc-retry-pushback-ms: 1000 ms on 115 of 115 refusals"
    mixed = summarize(4, [refusal, refusal, Outcome("refused", "RESOURCE_EXHAUSTED", 0.002, 0, 250.0),
                          Outcome("refused", "RESOURCE_EXHAUSTED", 0.002)], 1.0)
    assert pushback_line(mixed) == "grpc-retry-pushback-ms: 250 ms on 1, 1000 ms on 2 of 4 refusals"
    assert pushback_line(summarize(1, [Outcome("refused", "RESOURCE_EXHAUSTED", 0.002)], 1.0)) == (
        "grpc-retry-pushback-ms: none on 1 refusals")


def test_a_failure_keeps_its_message_and_a_phase_its_first_per_code():
    first = outcome_of(Unavailable(grpc.StatusCode.UNAVAILABLE, "the engine unit failed", "r1"), 0.5)
    assert first.message == "UNAVAILABLE: the engine unit failed [request r1]"
    later = outcome_of(Unavailable(grpc.StatusCode.UNAVAILABLE, "down"), 0.6)
    assert summarize(3, [first, later, done(0.1)], 1.0)["failed_example"] == {"UNAVAILABLE": first.message}
    assert outcome_of(None, 0.1).message == ""


def test_a_phase_with_nothing_completed_has_no_latency_and_stays_valid_json():
    s = summarize(sent=2, outcomes=[Outcome("failed", "UNAVAILABLE", 0.01)], wall_s=0.0)
    assert (s["completed"], s["lost"], s["goodput_rps"]) == (0, 1, 0.0)
    assert s["latency_ms_p50"] is s["latency_ms_p99"] is s["refusal_ms_p50"] is s["pushback_ms_p50"] is None
    assert s["pushback_ms_seen"] == {}
    json.dumps(s, allow_nan=False)


def test_totals_add_up_the_phases():
    a = summarize(3, [done(0.1), done(0.2), Outcome("refused", "RESOURCE_EXHAUSTED", 0.001)], 1.0)
    b = summarize(2, [Outcome("failed", "UNAVAILABLE", 1.0)], 1.0)
    assert totals({"a": a, "b": b}) == {"sent": 5, "completed": 2, "refused": 1, "failed": 1, "lost": 1}


def test_poisson_arrivals_are_seeded_and_near_their_rate():
    a = arrival_times(20.0, 50.0, random.Random(7))
    assert a == arrival_times(20.0, 50.0, random.Random(7))
    assert a == sorted(a) and all(0 < t < 50.0 for t in a)
    assert len(a) == pytest.approx(1000, rel=0.15)
    with pytest.raises(ValueError):
        arrival_times(0.0, 1.0, random.Random(0))


def test_completion_gap_is_the_loads_outage_after_a_kill():
    # completions at 1.0 and 1.1 (finishing as the kill lands at 1.0), none until 9.0, then steady
    ends = [0.5, 1.0, 1.1, 9.0, 9.5, 10.0]
    assert completion_gap(ends, since=1.0, until=11.0) == (pytest.approx(7.9), pytest.approx(8.0))
    assert completion_gap([0.5, 1.5], since=1.0, until=20.0) == (pytest.approx(18.5), None)  # never resumed
    assert completion_gap([], since=0.0, until=3.0) == (3.0, None)


def test_health_reads_down_up_or_unknown_and_unavailable_only_counts_for_the_gateway_kill():
    assert health_state("SERVING", False) == "up"
    assert health_state("NOT_SERVING", False) == health_state("NOT_SERVING", True) == "down"
    assert health_state("UNAVAILABLE", True) == "down"  # the gateway is down: nothing listens
    assert health_state("UNAVAILABLE", False) == "unknown"
    assert health_state("DEADLINE_EXCEEDED", True) == health_state("SERVICE_UNKNOWN", False) == "unknown"


def test_serving_again_needs_health_back_after_not_serving_and_a_probe():
    reads = [(0.1, "SERVING"), (0.9, "SERVING"), (1.2, "NOT_SERVING"), (5.0, "NOT_SERVING"), (9.3, "SERVING"),
             (9.4, "SERVING")]
    assert recovery(reads, probe_ok=8.0, watched_s=9.5, gateway=False) == (1.2, 9.3)  # health last
    assert recovery(reads, probe_ok=11.0, watched_s=11.0, gateway=False) == (1.2, 11.0)  # the probe last
    assert recovery(reads, probe_ok=None, watched_s=9.5, gateway=False) == (1.2, None)  # no probe yet
    assert recovery(reads[:4], probe_ok=4.0, watched_s=5.0, gateway=False) == (1.2, None)  # still down
    # a probe that succeeded before health went down still counts: it succeeded after the kill
    assert recovery(reads, probe_ok=0.5, watched_s=9.5, gateway=False) == (1.2, 9.3)


def test_a_kill_health_never_noticed_is_serving_at_the_probe_once_health_was_watched_long_enough():
    reads = [(t / 10, "SERVING") for t in range(1, 100)]
    assert recovery(reads, probe_ok=3.0, watched_s=HEALTH_WATCH_S - 0.1, gateway=False) == (None, None)
    assert recovery(reads, probe_ok=3.0, watched_s=HEALTH_WATCH_S, gateway=False) == (None, 3.0)
    assert recovery(reads, probe_ok=None, watched_s=60.0, gateway=False) == (None, None)


def test_the_gateway_kill_counts_a_refused_health_call_as_not_serving():
    reads = [(0.05, "SERVING"), (0.2, "UNAVAILABLE"), (3.0, "UNAVAILABLE"), (6.0, "NOT_SERVING"), (8.1, "SERVING")]
    assert recovery(reads, probe_ok=8.5, watched_s=8.6, gateway=True) == (0.2, 8.5)
    # for another kill an UNAVAILABLE read tells nothing: NOT_SERVING is the first down read
    assert recovery(reads, probe_ok=8.5, watched_s=8.6, gateway=False) == (6.0, 8.5)


def test_capacity_is_units_times_ranks_times_max_running():
    assert capacity_of({"units": {"min": 1, "max": 1}, "attention_ranks": 2, "engine": {"max_running": 4}}) == 8
    assert capacity_of({"units": {"min": 3}, "attention_ranks": 1, "engine": {"max_running": 16}}) == 48


# ----------------------------------------------------------------------------------------------- kill targets

SERVE = 100
TABLE = [
    Proc(1, 0, "/sbin/init"),
    Proc(SERVE, 1, "python -m dgserve.cluster.cli serve --port 2000"),
    Proc(101, SERVE, "gcs_server --log_dir=/tmp/dgray-x"),
    Proc(102, SERVE, "raylet --raylet_socket_name=/tmp/dgray-x"),
    Proc(110, 102, "ray::ServeController.listen_for_change", start=10),
    Proc(111, 102, "ray::ServeReplica:dgserve:EngineUnit", start=11),
    Proc(112, 102, "ray::ServeReplica:dgserve:Gateway", start=12),
    Proc(120, 102, "ray::RankActor", start=20, threads=("gloo_tcp_loop", "pt_tcpstore_uv", "ray::RankActor")),
    Proc(121, 102, "ray::RankActor.generate", start=21, threads=("gloo_tcp_loop", "ray::RankActor")),
    Proc(130, 102, "ray::IDLE", start=30),
    Proc(200, 1, "ray::RankActor", start=5, threads=("gloo_tcp_loop",)),  # another server's rank
]


def test_descendants_walk_ppid_below_the_serve_process_only():
    assert [p.pid for p in descendants(TABLE, SERVE)] == [101, 102, 110, 111, 112, 120, 121, 130]
    assert descendants(TABLE, 999) == []


def test_the_rank_kill_prefers_a_non_zero_rank_of_this_server():
    procs = descendants(TABLE, SERVE)
    proc, what = kill_target(procs, "rank")
    assert proc.pid == 121 and "non-zero" in what  # 120 serves the TCP store: rank 0; 200 is not ours


def test_the_rank_kill_says_so_when_it_cannot_tell_rank_0_apart():
    blind = [Proc(120, 102, "ray::RankActor", start=20), Proc(121, 102, "ray::RankActor", start=21)]
    proc, what = kill_target(blind, "rank")
    assert proc.pid == 121 and "unknown" in what
    only_zero = [Proc(120, 102, "ray::RankActor", threads=("pt_tcpstore_uv",))]
    assert kill_target(only_zero, "rank")[0].pid == 120


def test_replica_kills_pick_the_newest_replica_of_the_right_deployment():
    procs = [*descendants(TABLE, SERVE), Proc(140, 102, "ray::ServeReplica:dgserve:EngineUnit", start=40)]
    assert kill_target(procs, "unit")[0].pid == 140  # the rebuilt replica, not the one being stopped
    assert kill_target(procs, "gateway")[0].pid == 112
    starting = [Proc(150, 102, "ray::SERVE_REPLICA::gw#Gateway#7h7g:ServeReplica:gw:Gateway.__init__", start=50),
                Proc(151, 102, "ray::ServeReplica:gw:GatewayX", start=51)]
    assert kill_target(starting, "gateway")[0].pid == 150 and kill_target(starting, "unit")[0] is None


def test_a_missing_target_is_named():
    procs = [Proc(130, 102, "ray::IDLE")]
    for target in KILL_TARGETS:
        proc, what = kill_target(procs, target)
        assert proc is None and what.startswith("no ")
    with pytest.raises(ValueError):
        kill_target(procs, "raylet")


# ----------------------------------------------------------------------------------------------- report


def fake_result(chaos_lost: bool = False, back: bool = True) -> dict:
    ok = summarize(4, [done(0.2), done(0.3), done(0.4), done(0.5)], 2.0)
    over = summarize(6, [done(1.0), Outcome("refused", "RESOURCE_EXHAUSTED", 0.003, 0, 1000.0)] * 3, 3.0)
    chaos = summarize(5, [done(0.4)] * (4 if chaos_lost else 5), 10.0)
    kills = [{"target": t, "pid": 300 + i, "what": "x", "title": "ray::X", "not_serving_after_s": 1.5,
              "serving_again_s": 12.5 if back else None, "health_ok_s": 12.0 if back else None, "probe_ok_s": 12.5,
              "health_reads": {"NOT_SERVING": 100, "SERVING": 20}, "probe_errors": {"UNAVAILABLE": 3},
              "no_completions_s": 11.0, "completions_resumed_s": 12.0}
             for i, t in enumerate(KILL_TARGETS)]
    load = {"cpu_count": 2, "load_before": [0.1] * 3, "load_after": [1.0] * 3, "own_threads": 6,
            "contended": False, "warnings": []}
    topology = {"units": {"min": 1, "max": 1}, "attention_ranks": 2, "engine": {"max_running": 4, "max_queued": 8},
                "watchdog_s": 5, "serve": {"health_check_period_s": 1.0}}
    return {"config": {"seed": 0, "topology": topology, "prompt_len": 16, "max_new_tokens": 64,
                       "max_denoising_steps": 4}, "capacity": 8, "wall_s": 100.0, "load": load,
            "threads": {"line": "t"}, "server": {"rc": 0, "forced": False, "leftovers_killed": []},
            "phases": {"calibration": ok | {"throughput_rps": 2.0, "concurrency": 8},
                       "overload": over | {"rate_rps": 4.0, "deadline_s": 20.0},
                       "chaos": chaos | {"rate_rps": CHAOS_FACTOR * 2.0, "kills": kills}}}


def test_json_shape():
    out = json.loads(json.dumps(as_json(fake_result()), allow_nan=False))
    assert {"capacity", "calibration", "overload", "chaos", *COUNTS} <= set(out)
    for name in ("calibration", "overload", "chaos"):
        p = out[name]
        assert {*COUNTS, "failed_by_code", "goodput_rps", "goodput_tokens_per_s", "latency_ms_p50",
                "latency_ms_p99"} <= set(p)
    assert [k["target"] for k in out["chaos"]["kills"]] == list(KILL_TARGETS)
    assert all({"target", "pid", "not_serving_after_s", "serving_again_s", "no_completions_s",
                "completions_resumed_s"} <= set(k) for k in out["chaos"]["kills"])
    assert (out["sent"], out["completed"], out["refused"], out["failed"], out["lost"]) == (15, 12, 3, 0, 0)
    assert out["ok"] is True and out["capacity"] == 8


def test_failures_name_lost_requests_and_a_server_that_did_not_come_back():
    assert failures(fake_result()) == []
    assert failures(fake_result(chaos_lost=True)) == ["chaos: 1 request(s) lost"]
    bad = failures(fake_result(back=False))
    assert len(bad) == 3 and all("not serving again" in f for f in bad)
    assert as_json(fake_result(chaos_lost=True))["ok"] is False


def test_table_rows_show_every_phase_and_the_goal_verdict():
    r = fake_result()
    rows = phase_rows(r["phases"])
    assert [row[0] for row in rows[1:]] == ["calibration", "overload", "chaos"]
    assert len({len(row) for row in rows}) == 1
    assert rows[1][1] == "closed" and rows[2][1] == "4.00"
    kills = kill_rows(r["phases"]["chaos"]["kills"])
    assert len({len(row) for row in kills}) == 1
    head = kills[0]
    row = dict(zip(head, kills[1], strict=True))
    assert row["not_serving_after_s"] == "1.5" and row["serving_again_s"] == "12.5" and "met" in row["goal"]
    assert head.index("goal") == head.index("serving_again_s") + 1  # the goal next to what it judges
    bad = dict(zip(head, kill_rows(fake_result(back=False)["phases"]["chaos"]["kills"])[1], strict=True))
    assert "NOT BACK" in bad["goal"] and bad["serving_again_s"] == "-"
    assert not math.isnan(float(rows[1][9]))


def test_the_report_states_the_chaos_rate_and_the_pushback_values():
    text = "\n".join(report_lines(fake_result()))
    assert f"chaos (arrivals at {CHAOS_FACTOR:g}x calibrated throughput" in text
    assert "grpc-retry-pushback-ms: 1000 ms on 3 of 3 refusals" in text
