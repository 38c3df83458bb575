"""Engine errors. Each carries a status code that maps one-to-one onto a gRPC status in the gateway."""

from __future__ import annotations

from enum import StrEnum

from dgserve.model.errors import DGServeError


class Code(StrEnum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # retriable: busy now (a full queue, memory for now)
    OUT_OF_RANGE = "OUT_OF_RANGE"  # never retriable: the request can never fit this deployment
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    UNAVAILABLE = "UNAVAILABLE"  # retriable: the engine stopped or failed, the request may be sent again
    INTERNAL = "INTERNAL"


class EngineError(DGServeError):
    code: Code = Code.INTERNAL

    def __init__(self, message: str, code: Code | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def retriable(self) -> bool:
        return self.code in (Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED)


class ResourceExhausted(EngineError):
    """Busy now: the queue bound (retry later)."""

    code = Code.RESOURCE_EXHAUSTED


class TooLarge(EngineError):
    """The request can never fit (its KV cache and canvases exceed the whole memory budget): never retriable."""

    code = Code.OUT_OF_RANGE


class DeadlineExceeded(EngineError):
    code = Code.DEADLINE_EXCEEDED


class Cancelled(EngineError):
    code = Code.CANCELLED


class Unavailable(EngineError):
    code = Code.UNAVAILABLE


class UnitFailure(RuntimeError):
    """A rank of the engine unit failed or stopped answering: every in-flight request fails with UNAVAILABLE
    and the unit must be rebuilt (raised by group executors; never a user error)."""
