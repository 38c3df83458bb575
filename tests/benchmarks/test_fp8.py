"""benchmarks/fp8.py --quick: FP8 experts meet their accuracy and memory goals against bfloat16."""

from __future__ import annotations

import json

from benchmarks.fp8 import GOALS, main


def test_fp8_experts_meet_the_accuracy_and_memory_goals(capsys):
    assert main(["--quick", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["rel_error"] <= GOALS["rel_error"] and r["cosine"] >= GOALS["cosine"]
    assert r["memory_ratio"] <= 0.51 and r["memory"]["fp8_gb"] < 23
    assert r["argmax_agreement"] >= 0.9 and r["tiny_peaked"]["positions"] >= 128
    assert r["tiny_peaked"]["prequantized_argmax_agreement"] >= 0.9  # the compressed-tensors checkpoint too
    assert r["rel_error"] > 1e-3  # the FP8 path really ran (bfloat16 against itself would be 0)
    assert r["grouped_gemm"]["fp8_path"] == "widened"  # CPU: the FP8 values in a float32 grouped GEMM
