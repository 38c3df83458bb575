"""benchmarks/prefix.py on a small workload: the same replies with the cache off and on, and fewer prompt tokens
encoded with it (each side's count checked against the prefill rows its engine ran)."""

from __future__ import annotations

import json

from benchmarks.prefix import main


def test_the_cache_encodes_less_for_the_same_replies(capsys):
    args = ["--quick", "--json", "--prompt-len", "64", "--turns", "2", "--prefill-chunk", "64",
            "--max-denoising-steps", "1"]
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["same_tokens"] and r["encoded_matches_prefill_rows"]
    # turn 1: 4 x 114 prompt tokens either way (the conversations start together: nothing is cached yet); turn 2
    # (228 tokens) reuses the system prompt's chunk (turn 1's second chunk, [64, 114), is not one of turn 2's)
    assert r["prompt_tokens_encoded"] == {"off": 4 * 114 + 4 * 228, "on": 4 * 114 + 4 * (228 - 64)}
    assert [t["encoded"] for t in r["turns"]["on"]] == [456, 656] and r["sides"]["on"]["hits"] == 4
    assert r["prefix_speedup"] > 0
