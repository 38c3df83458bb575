"""benchmarks/moe_layer.py: its flags and its inputs (the same in every process, so the sides do the same work)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.moe_layer import layer_inputs, parse


def test_every_process_builds_the_same_layer_and_rows():
    args = parse(["--quick", "--rows", "40", "--items", "4"])
    a, b = layer_inputs(args), layer_inputs(args)
    assert torch.equal(a[0].gate_up, b[0].gate_up) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert a[4].bounds == (0, 10, 20, 30, 40) and a[2].shape == (40, 4)


def test_bad_flags_are_clear_errors(capsys):
    with pytest.raises(SystemExit):
        parse(["--top-k", "40"])
    assert "--top-k" in capsys.readouterr().err
