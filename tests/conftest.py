"""Shared fixtures: one torch thread per test process, tiny checkpoints built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from dgserve.model.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def confident_dir(tmp_path_factory):
    """The tiny model with a planted copy path: blocks stop after a number of steps that varies by request."""
    from dgserve.model.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("confident") / "ckpt", seed=0, preset="confident")


@pytest.fixture(scope="session")
def ref_folders(tmp_path_factory):
    """Reference checkpoints written by transformers' save_pretrained, built lazily by spec name."""
    from tests.reference import SPECS, build_reference

    root = tmp_path_factory.mktemp("ref")
    made: dict[str, object] = {}

    def get(name: str, degenerate: bool = False):
        key = f"{name}{'-degenerate' if degenerate else ''}"
        if key not in made:
            made[key] = root / key
            build_reference(SPECS[name], made[key], degenerate=degenerate)
        return made[key]

    return get
