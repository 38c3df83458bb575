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


def choice() -> str:
    """The `DGSERVE_KERNELS` setting: auto, triton or torch."""
    value = os.environ.get(ENV, "auto")
    if value not in ("auto", "triton", "torch"):
        raise ValueError(f"{ENV}={value!r}: expected auto, triton or torch")
    return value


def use_triton(device: torch.device) -> bool:
    """Whether kernels on `device` run their Triton version."""
    choice_ = choice()
    if choice_ == "torch":
        return False
    if choice_ == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV}=triton but Triton is not installed (pip install triton)")
        return device.type == "cuda" or interpreting()
    return device.type == "cuda" and triton_available()
