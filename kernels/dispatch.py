"""Which implementation a kernel runs: Triton on CUDA when Triton is importable, the torch reference otherwise.

`DGSERVE_KERNELS=triton` forces Triton (with `TRITON_INTERPRET=1` it runs on CPU tensors: the tests),
`DGSERVE_KERNELS=torch` forces the references (a way around a kernel bug in production).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

ENV = "DGSERVE_KERNELS"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(device: torch.device) -> bool:
    """Whether kernels on `device` run their Triton version."""
    choice = os.environ.get(ENV, "auto")
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"{ENV}={choice!r}: expected auto, triton or torch")
    if choice == "torch":
        return False
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV}=triton but Triton is not installed (pip install triton)")
        return device.type == "cuda" or interpreting()
    return device.type == "cuda" and triton_available()
