"""The engine: continuous batching of prefill chunks, denoise steps and commits over many requests."""

from .config import EngineConfig
from .engine import Engine, EngineRequest
from .errors import Code, EngineError
from .events import BlockCommitted, Draft, Failed, Finished, RequestStream, Stats
from .metrics import EngineMetrics

__all__ = ["BlockCommitted", "Code", "Draft", "Engine", "EngineConfig", "EngineError", "EngineMetrics",
           "EngineRequest", "Failed", "Finished", "RequestStream", "Stats"]
