"""`dgserve fabric-check` (cluster/experts/fabric_check.py): its arguments, and its verdict on the rows. Two pods
at once over gloo run in tests/helm/test_fabric_check.py, through the Helm hook's script."""

from __future__ import annotations

import argparse

import pytest

from dgserve.cluster.cli import main
from dgserve.cluster.experts.fabric_check import parse_size, report


def test_sizes_read_as_nccl_tests_writes_them():
    assert [parse_size(s) for s in ("4096", "64K", "8M", "1g")] == [4096, 64 << 10, 8 << 20, 1 << 30]
    with pytest.raises(argparse.ArgumentTypeError, match="'8MB' is not a size"):
        parse_size("8MB")


@pytest.mark.parametrize(("argv", "message"), [
    (["--node-rank", "2", "--nodes", "2"], "--node-rank 2 is not in 0..1"),
    (["--node-rank", "0", "--nodes", "1", "--min-bytes", "2M", "--max-bytes", "1M"], "is above --max-bytes"),
    (["--node-rank", "0", "--nodes", "1", "--gpus", "0"], "no GPU on this pod"),
])
def test_bad_arguments_exit_2_naming_them(argv, message, capsys):
    assert main(["fabric-check", "--master", "127.0.0.1:1", "--backend", "gloo", *argv]) == 2
    assert message in capsys.readouterr().err


def test_the_verdict_is_the_mean_busbw_against_the_threshold_and_no_wrong_element(capsys):
    rows = [{"bytes": 1024, "time_us": 10.0, "algbw_gbs": 2.0, "busbw_gbs": 1.0, "wrong": 0},
            {"bytes": 2048, "time_us": 10.0, "algbw_gbs": 6.0, "busbw_gbs": 3.0, "wrong": 0}]
    args = argparse.Namespace(nodes=2, backend="gloo", min_busbw=2.0, json=False)
    assert report(rows, args, 1) == 0 and "# Avg bus bandwidth    : 2.00" in capsys.readouterr().out
    assert report(rows, argparse.Namespace(**{**vars(args), "min_busbw": 2.5}), 1) == 1
    rows[0]["wrong"] = 3
    assert report(rows, args, 1) == 1 and "Out of bounds values : 3 FAILED" in capsys.readouterr().out
