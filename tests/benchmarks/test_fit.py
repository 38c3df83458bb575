"""benchmarks/fit.py: the plan table for the real model per device, the workspace figures and the kernel check."""

from __future__ import annotations

import json

from benchmarks.fit import main


def test_quick_run_plans_both_gpus_and_checks_the_kernel(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["--quick", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    plan = {(r["device"], r["dtype"], r["sampler"]): r for r in out["plans"]}
    assert plan[("H200 141GB", "bfloat16", "fused")]["admitted"] >= 32
    assert not plan[("H100 80GB", "float32", "fused")]["fits"]  # 101 GB of float32 weights
    assert plan[("H100 80GB", "bfloat16", "exact")]["admitted"] < plan[("H100 80GB", "bfloat16", "fused")]["admitted"]
    assert out["workspace"]["triton_mb"] <= 16 and out["workspace"]["exact_cv_mb"] == 256
    kernel = out["kernel"]
    assert "skipped" in kernel or (kernel["argmax_equal"] and kernel["sample_equal"] and kernel["soft_vs_torch"] < 1e-4)
