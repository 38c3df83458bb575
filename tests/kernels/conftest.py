"""Triton kernels run on CPU under Triton's interpreter in these tests (set before any kernel is defined)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
