"""benchmarks/topology.py: the planner's model (known inputs give known numbers; expert ranks, links and batch move
it the way they should), the link fit, the CPU check's parts and prediction, and the H100 verdicts."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from benchmarks import topology as t
from dgserve.cluster.experts.selftest import bandwidths

DIMS = t.ModelDims()
H100 = t.Gpu()
REPLICATED, PACKED, DISAGG = t.h100_profiles(t.NVLINK, t.INFINIBAND)


def sweep_rows(latency_s: float, bytes_per_s: float, ranks: int) -> list[dict]:
    """Rows as all_to_all.py writes them, for an exact latency + bytes / bandwidth link."""
    rows = []
    for size in (4096 << i for i in range(8)):
        crossing = size * (ranks - 1) / ranks
        sec = latency_s + crossing / bytes_per_s
        alg, bus = bandwidths(size, sec, ranks)
        rows.append({"bytes": size, "time_us": sec * 1e6, "algbw_gbs": alg, "busbw_gbs": bus, "wrong": 0})
    return rows


def test_the_real_model_figures_match_the_spec():
    assert DIMS.expert_params * DIMS.experts == pytest.approx(761.3e6, rel=1e-3)  # SERVING_ANCHORS section 7
    sliding = (4096 + 2048 + 2048) * 2816 + 2816 * 4096  # q, k, v, o (MODEL_SPEC 2.3)
    full = (8192 + 1024) * 2816 + 2816 * 8192  # q, k, o: full layers have no v_proj
    assert DIMS.attention_params_per_layer * DIMS.layers == pytest.approx(25 * sliding + 5 * full)
    assert t.touched_experts(1, 128, 8) == pytest.approx(8) and t.touched_experts(256, 128, 8) == pytest.approx(128)
    assert t.touched_experts(16, 128, 8) == pytest.approx(82.4, abs=0.1)


def test_known_inputs_give_known_numbers():
    # batch 1 on one GPU reads all 128 experts' bf16 weights: memory-bound
    assert t.expert_layer_s(DIMS, H100, 1, 1) == pytest.approx(128 * 3 * 2816 * 704 * 2 / 3.35e12, rel=1e-6)
    # packed, batch 1: 256 rows x top-8 of 2816 bf16 values (+ 8 B of metadata each) out and back, 4 collectives
    row = 2816 * 2 + 8
    assert t.exchange_layer_s(DIMS, PACKED, 1) == pytest.approx(4 * 20e-6 + 2 * 256 * 8 * row / 450e9)
    pred = t.predict(DIMS, H100, REPLICATED, t.Workload(1, steps_per_block=16))
    assert pred.exchange_s == 0 and pred.tokens_per_forward == pytest.approx(256 / 17)
    assert pred.tokens_per_s_request == pytest.approx(256 / 17 / pred.step_s) == pred.tokens_per_s_gpu
    assert pred.step_s == pytest.approx(pred.attention_s + pred.experts_s + pred.head_s)


def test_more_expert_ranks_cut_the_expert_time():
    one, six, eight = (t.expert_layer_s(DIMS, H100, 16, e) for e in (1, 6, 8))
    assert one / six == pytest.approx(6) and one / eight == pytest.approx(8)
    assert t.predict(DIMS, H100, PACKED, t.Workload(1)).experts_s < t.predict(
        DIMS, H100, REPLICATED, t.Workload(1)).experts_s


def test_infiniband_makes_the_disaggregated_exchange_larger():
    over_nvlink = replace(DISAGG, link=t.NVLINK)
    assert t.exchange_layer_s(DIMS, DISAGG, 16) > 5 * t.exchange_layer_s(DIMS, over_nvlink, 16)
    assert t.exchange_layer_s(DIMS, REPLICATED, 16) == 0
    # more canvases per attention rank: more bytes through its link
    assert t.exchange_layer_s(DIMS, PACKED, 64) > t.exchange_layer_s(DIMS, PACKED, 1)


def test_h100_verdicts_batch_1_packed_per_request_replicated_per_gpu_and_64_does_not_fit_one_gpu():
    """With the exact sampler ([C, V] workspace per canvas) 64 canvases do not fit one H100; with the fused one
    they do."""
    assert t.predict(DIMS, H100, REPLICATED, t.Workload(64)).fits
    DIMS_EXACT = replace(DIMS, sampler="exact")
    preds = {b: {p.profile: p for p in (t.predict(DIMS_EXACT, H100, prof, t.Workload(b))
                                         for prof in (REPLICATED, PACKED, DISAGG))} for b in (1, 16, 64)}
    one = preds[1]
    assert one["packed"].tokens_per_s_request > one["replicated"].tokens_per_s_request > one[
        "disaggregated"].tokens_per_s_request
    assert one["disaggregated"].exchange_s > one["disaggregated"].step_s / 2  # IB dominates its step
    assert preds[16]["replicated"].tokens_per_s_gpu > preds[16]["packed"].tokens_per_s_gpu
    assert not preds[64]["replicated"].fits and preds[64]["packed"].fits
    lines = t.reasons(list(one.values()))
    assert lines[0].startswith("per request: packed wins") and any(ln.startswith("per GPU: replicated wins")
                                                                   for ln in lines)
    assert "vs replicated" in "\n".join(lines) and "exchange" in "\n".join(lines)
    fit = t.largest_fitting_batch(DIMS_EXACT, H100, REPLICATED, 4096)
    assert 16 <= fit < 64 < t.largest_fitting_batch(DIMS, H100, REPLICATED, 4096)
    big = t.reasons(list(preds[64].values()),
                    {"replicated": t.predict(DIMS_EXACT, H100, REPLICATED, t.Workload(fit))})
    assert big[0].startswith("replicated does not fit 64 canvases") and f"({fit})" in big[0]


def test_a_measured_expert_layer_replaces_the_roofline_and_expert_ranks_take_a_share():
    measured = {4: 2e-3}
    pred = t.predict(DIMS, H100, PACKED, t.Workload(4), measured)
    assert pred.experts_measured and pred.experts_s == pytest.approx(DIMS.layers * 2e-3 / 6)
    assert not t.predict(DIMS, H100, PACKED, t.Workload(1), measured).experts_measured


def test_measure_expert_layer_runs_the_co_located_layer():
    dims = replace(DIMS, hidden=32, experts=4, top_k=2, expert_width=16, canvas=8)
    assert t.measure_expert_layer(dims, 2, "cpu", "float32", iters=1, warmup=0) > 0


def test_link_fit_recovers_latency_and_bandwidth_and_link_json_overrides(tmp_path):
    rows = sweep_rows(30e-6, 2e9, 3)
    fit = t.fit_link(rows)
    assert fit.latency_s == pytest.approx(30e-6, rel=1e-6) and fit.bytes_per_s == pytest.approx(2e9, rel=1e-6)
    assert fit.ranks == 3 and fit.rows == 8
    noisy = [dict(r) for r in rows]
    noisy[3]["time_us"] *= 50  # one wild row (a descheduled rank) barely moves a robust fit
    assert t.fit_link(noisy).bytes_per_s == pytest.approx(2e9, rel=0.05)
    nccl = [{**r, "source": "nccl-tests"} for r in sweep_rows(10e-6, 300e9, 8)]
    path = tmp_path / "a2a.json"
    path.write_text("table\n" + json.dumps({"rows": rows + nccl}))
    assert t.read_link_json(path) == nccl  # nccl-tests' rows win
    nvlink, ib, measured = t.links(t.parse(["--link-json", str(path)]))
    assert nvlink.bytes_per_s == pytest.approx(300e9, rel=1e-6) and measured["for"] == "nvlink"
    assert (ib.bytes_per_s, ib.latency_s) == pytest.approx((t.INFINIBAND.bytes_per_s, t.INFINIBAND.latency_s))
    _, ib, _ = t.links(t.parse(["--link-json", str(path), "--link-json-for", "ib"]))
    assert ib.latency_s == pytest.approx(10e-6, rel=1e-6)


def test_the_split_prediction_runs_expert_ranks_in_parallel_only_up_to_the_cores():
    link = t.LinkFit(1e-3, 1e9, ranks=5, rows=8)
    parts = t.SplitParts(4, attention_s=2e-3, expert_s=(4e-3, 4e-3, 4e-3, 6e-3), rows=(1, 1, 1, 1),
                         exchange_bytes=10_000_000)
    two, eight = t.predict_split(parts, link, cores=2), t.predict_split(parts, link, cores=8)
    assert two["experts_s"] == pytest.approx(9e-3) and eight["experts_s"] == pytest.approx(6e-3)  # sum/2, slowest
    # loopback: 5 ranks x 1 GB/s busbw on 2 cores -> the split's rows at 2.5 GB/s; on 8 cores at 1 GB/s
    assert two["exchange_s"] == pytest.approx(4e-3 + 4e-3) and eight["exchange_s"] == pytest.approx(4e-3 + 10e-3)
    assert two["seconds"] == pytest.approx(2e-3 + 9e-3 + 8e-3)
    assert t.prediction_error(1.2, 1.0) == pytest.approx(0.2) and t.prediction_error(0.8, 1.0) == pytest.approx(0.2)


def test_the_parts_are_what_the_split_sends_and_runs():
    args = t.parse(["--quick", "--rows", "48", "--items", "4", "--hidden", "32", "--experts", "8",
                    "--expert-width", "16", "--iters", "1", "--warmup", "0"])
    parts = t.measure_parts(args, 2, t.moe_layer.layer_inputs(args))
    P = 48 * args.top_k
    assert sum(parts.rows) == P and len(parts.expert_s) == 2 and all(s > 0 for s in parts.expert_s)
    assert parts.exchange_bytes == 2 * P * 32 * 4 + P * 16  # rows out and back (float32) + int64 metadata pairs
    # the stubs are gone afterwards: the real collectives are back in place
    from dgserve.cluster.experts import exchange
    assert exchange.exchange.__module__ == exchange.__name__


def test_sweep_sizes_reach_the_largest_collective():
    sizes = t.sweep_sizes(10 << 20, 3)
    assert sizes[0] <= 4096 and 5 << 20 <= sizes[-1] <= 8 << 20


def test_main_prints_the_h100_table_and_json(capsys):
    assert t.main(["--skip-cpu-check", "--json", "--batches", "1", "64", "--sampler", "exact"]) == 0
    text = capsys.readouterr().out
    out = json.loads(text.strip().splitlines()[-1])
    assert set(out["h100"]["predictions"]) == {"1", "64"} and out["cpu_check"] is None
    assert [p["profile"] for p in out["h100"]["predictions"]["1"]] == ["replicated", "packed", "disaggregated"]
    assert "per request: packed wins" in text and "replicated does not fit 64 canvases" in text
    assert f"this machine has {torch.cuda.device_count()}" in text
