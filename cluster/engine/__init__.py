"""The engine: continuous batching of prefill chunks, denoise steps and commits over many requests.

The engine itself (torch) is imported on first use, so that its typed messages (config, errors, events) can be
used by processes that only relay requests (a unit's Serve replica) without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import EngineConfig
from .errors import Code, EngineError
from .events import BlockCommitted, Draft, Failed, Finished, RequestStream, Stats

if TYPE_CHECKING:
    from .engine import Engine, EngineRequest
    from .metrics import EngineMetrics

__all__ = ["BlockCommitted", "Code", "Draft", "Engine", "EngineConfig", "EngineError", "EngineMetrics",
           "EngineRequest", "Failed", "Finished", "RequestStream", "Stats"]


def __getattr__(name: str):
    if name in ("Engine", "EngineRequest"):
        from . import engine

        return getattr(engine, name)
    if name == "EngineMetrics":
        from .metrics import EngineMetrics

        return EngineMetrics
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
