"""benchmarks/gpu_check.sh --dry-run: every stage of the GPU check at tiny size on the CPU, so the script that runs
on a lent GPU for a few minutes is known to work before it gets there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    return proc, json.loads((out / "gpu_bench.json").read_text()), out


def test_every_stage_runs_and_the_table_comes_last(dry_run):
    proc, data, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {k: v["status"] for k, v in data["stages"].items()} == dict.fromkeys(
        ("env", "kernels", "dgserve", "reference", "fp8", "parity"), "ok")
    assert "== GPU check ==" in proc.stdout and "transformers batch 1" in proc.stdout


def test_both_sides_do_the_same_passes(dry_run):
    _, data, _ = dry_run
    sizes, levels = data["meta"]["sizes"], data["stages"]["dgserve"]["levels"]
    C = 32  # the tiny preset's canvas
    assert [lv["batch"] for lv in levels] == sizes["batches"]
    for lv in levels:  # no early stop, no EOS: blocks x steps passes for every request
        assert lv["steps_per_block"] == [sizes["steps"]] and lv["tokens"] == lv["batch"] * sizes["blocks"] * C
    fp8 = data["stages"]["fp8"]
    assert fp8["experts_dtype"] == "fp8" and fp8["weight_bytes"] < data["stages"]["dgserve"]["weight_bytes"]
    assert [lv["batch"] for lv in fp8["levels"]] == [1] and fp8["levels"][0]["tokens"] == sizes["blocks"] * C
    ref = data["stages"]["reference"]
    assert ref["same_passes"] and ref["decoder_passes"] == sizes["blocks"] * sizes["steps"]
    assert ref["same_token_count"] and ref["tokens"] == sizes["blocks"] * C
    assert ref["same_tokens_fraction"] > 0.9  # the same weights on both sides (bf16 on CPU: nearly all equal)


def test_the_parity_probe_sees_identical_random_calls_on_cpu(dry_run):
    _, data, out = dry_run
    p = data["stages"]["parity"]
    assert p["logits_max_diff"] == 0.0 and p["token_exact_all"]
    assert p["rng"]["same_consumption"] and p["rng"]["reference_calls"] == p["rng"]["dgserve_calls"] > 10
    assert (out / "parity_rng.txt").read_text().count("\n") > 20


def test_a_failing_stage_is_reported_and_the_earlier_ones_are_already_on_disk(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    from benchmarks import gpu_bench, gpu_stages

    seen = {}

    def broken(device, out, quick):
        seen.update(json.loads((out / "gpu_bench.json").read_text())["stages"])
        raise RuntimeError("cut short")

    monkeypatch.setattr(gpu_stages, "parity", broken)
    rc = gpu_bench.main(["--out", str(tmp_path), "--dry-run", "--stages", "env,parity"])
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert rc == 1 and seen["env"]["status"] == "ok"
    assert data["stages"]["parity"] == {"status": "error", "error": "RuntimeError: cut short",
                                        "seconds": data["stages"]["parity"]["seconds"]}
