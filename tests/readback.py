"""A guard for graph-safe code: any call that brings a tensor's values to the host fails (what a CUDA graph cannot
hold, and what makes a GPU step wait for the device)."""

from __future__ import annotations

from torch.overrides import TorchFunctionMode


class NoReadBack(TorchFunctionMode):
    READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero", "unique",
             "unique_consecutive", "equal", "bincount"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        assert name not in self.READS, f"{name} reads a tensor back to the host"
        return func(*args, **(kwargs or {}))
