"""benchmarks/vision.py on a small workload: the table's counts are the processor's and the request's prompt holds
the image's soft tokens between <boi> and <eoi>."""

from __future__ import annotations

import json

from benchmarks.vision import main


def test_the_vision_benchmark_times_each_budget_and_the_request(capsys):
    assert main(["--quick", "--json", "--budgets", "70,140", "--max-denoising-steps", "1"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [b["budget"] for b in r["budgets"]] == [70, 140]
    for b in r["budgets"]:
        assert 0 < b["soft_tokens"] <= b["budget"] and b["patches"] == 9 * b["soft_tokens"] and b["encode_s"] > 0
    req, text = r["request"], r["text_only_request"]
    assert req["prompt_tokens"] == text["prompt_tokens"] + req["soft_tokens"] + 2  # <boi> soft tokens <eoi>
    assert 0 < r["vision_share"] < 1 and req["vision_s"] > 0 and text["soft_tokens"] == 0
