"""The split on a labelled multi-node Ray cluster through the gRPC gateway (tests/cluster/ray/multinode.py runs it
in its own process): packed 1 + 2 and disaggregated 2 + 2 give single-process tokens; the disaggregated unit's
ranks sit on the nodes their labels choose; a killed expert rank fails the stream in flight with UNAVAILABLE and
the unit serves again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dgserve.model.loader import load_checkpoint

from .test_units import requests, solo

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.slow  # ~110 s: a labelled 3-node cluster; tests/cluster/experts cover the split in-process


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory):
    reqs = requests(4, seed=11)
    folder = tmp_path_factory.mktemp("multinode")
    spec = {"model": str(tiny_dir), "requests": [{"prompt_ids": list(r.prompt_ids), "seed": r.seed,
                                                  "sampler": r.sampler} for r in reqs]}
    (folder / "spec.json").write_text(json.dumps(spec))
    p = subprocess.run([sys.executable, "-m", "tests.cluster.ray.multinode", str(folder / "spec.json"),
                        str(folder / "out.json")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    want = [list(solo(load_checkpoint(tiny_dir, dtype="float32"), r)) for r in reqs]
    return json.loads((folder / "out.json").read_text()), want


def test_a_packed_unit_of_one_attention_and_two_expert_ranks_serves_exact_tokens_over_grpc(run):
    out, want = run
    packed = out["packed"]
    assert packed["tokens"] == want
    assert [s["role"] for s in packed["started"]] == ["attention", "experts", "experts"]
    assert len({s["node"] for s in packed["started"]}) == 1  # STRICT_PACK: one node
    sweep = packed["all_to_all"]  # measured when the unit started
    assert len(sweep) == 3 and all(r["busbw_gbs"] > 0 and r["wrong"] == 0 for r in sweep)
    steps = packed["steps"]  # the exchange in the step statistics: time, rows per expert rank, imbalance
    assert steps["exchange_s_mean"] > 0 and steps["expert_imbalance_mean"] >= 1
    rows = {int(k): v for k, v in steps["expert_rows"].items()}
    assert set(rows) == {0, 1} and rows[0] < rows[1] / 2  # the explicit map: 1 of 8 experts on expert rank 0


def test_a_disaggregated_unit_places_ranks_by_label_serves_exact_tokens_and_survives_an_expert_rank(run, capsys):
    out, want = run
    d = out["disaggregated"]
    assert d["tokens"] == want
    assert d["placed"] == [{"role": "attention", "node_role": "attention"}] * 2 + [
        {"role": "experts", "node_role": "experts"}] * 2
    killed = d["killed"]
    assert killed["code"] == "UNAVAILABLE" and killed["after_s"] < 5, killed  # the watchdog is 3 s
    assert d["again"] == want[0] and d["new_unit"]
    with capsys.disabled():
        print(f"\ndisaggregated 2+2 on labelled nodes: expert rank killed by pid; the stream failed UNAVAILABLE after "
              f"{killed['after_s']:.2f}s; the unit served again {d['back_s']:.1f}s later")
