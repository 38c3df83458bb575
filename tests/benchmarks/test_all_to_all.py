"""benchmarks/all_to_all.py: sizes, the bandwidth formula, nccl-tests' rows, and a real two-rank gloo sweep."""

from __future__ import annotations

import json

import pytest

from benchmarks.all_to_all import main, parse_nccl_tests, sizes
from dgserve.cluster.experts.selftest import bandwidths

NCCL_TESTS_OUTPUT = """#  Rank  0 Group  0 Pid  123 on host device  0 [0x18] NVIDIA H100 80GB HBM3
#       size         count      type   redop    root     time   algbw   busbw #wrong     time   algbw   busbw #wrong
#        (B)    (elements)                               (us)  (GB/s)  (GB/s)            (us)  (GB/s)  (GB/s)
        1024            32     float    none      -1    20.10    0.05    0.04      0    19.80    0.05    0.05      0
     1048576         32768     float    none      -1    45.60   22.99   20.12      0    44.90   23.35   20.43      0
# Out of bounds values : 0 OK
"""


def test_sizes_double_and_split_evenly_over_the_ranks():
    assert sizes(1024, 8192, 4) == [1024, 2048, 4096, 8192]
    assert all(s % (4 * 3) == 0 for s in sizes(1000, 100_000, 3))  # whole float32 elements to each of 3 peers


def test_busbw_is_algbw_times_n_minus_1_over_n():
    alg, bus = bandwidths(8_000_000_000, 2.0, 8)
    assert alg == pytest.approx(4.0) and bus == pytest.approx(3.5)


def test_nccl_tests_rows_are_read():
    rows = parse_nccl_tests(NCCL_TESTS_OUTPUT)
    assert [r["bytes"] for r in rows] == [1024, 1048576]
    assert rows[1]["busbw_gbs"] == pytest.approx(20.12) and rows[1]["wrong"] == 0 and rows[0]["time_us"] == 20.10


def test_a_real_two_rank_sweep_moves_every_element_right(capsys):
    assert main(["--quick", "--max-bytes", "8192", "--iters", "2", "--warmup", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["bytes"] for r in out["rows"]] == [1024, 2048, 4096, 8192] and out["wrong"] == 0
    assert all(r["time_us"] > 0 and r["busbw_gbs"] == pytest.approx(r["algbw_gbs"] / 2) for r in out["rows"])
