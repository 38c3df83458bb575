"""Typed client errors, one per gRPC status the server uses; each carries the request id."""

from __future__ import annotations

import grpc

PUSHBACK = "grpc-retry-pushback-ms"  # the server's hint, with RESOURCE_EXHAUSTED, of when to try again


class DGServeClientError(Exception):
    retriable = False

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str | None = None,
                 retry_after_s: float | None = None):
        self.code, self.message, self.request_id = code, message, request_id
        self.retry_after_s = retry_after_s  # the server's retry hint, when it sent one
        rid = f" [request {request_id}]" if request_id else ""
        super().__init__(f"{code.name}: {message}{rid}")


class InvalidArgument(DGServeClientError):
    pass


class ResourceExhausted(DGServeClientError):
    """Busy now (the server's queues are full): retried after the server's hint (`retry_after_s`)."""

    retriable = True


class OutOfRange(DGServeClientError):
    """The request can never fit this deployment (e.g. its KV cache exceeds the memory budget): never retried;
    send a shorter prompt or fewer new tokens."""


class DeadlineExceeded(DGServeClientError):
    pass


class Cancelled(DGServeClientError):
    pass


class Unavailable(DGServeClientError):
    retriable = True


class ApiVersionMismatch(DGServeClientError):
    pass


class Unauthenticated(DGServeClientError):
    """No API key, or a wrong one (the server wants `authorization: Bearer <key>`)."""


BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def pushback_s(e: grpc.RpcError) -> float | None:
    """The server's retry hint in seconds (trailer grpc-retry-pushback-ms), if it sent a valid one."""
    trailers = dict(e.trailing_metadata() or ()) if hasattr(e, "trailing_metadata") else {}
    value = trailers.get(PUSHBACK)
    return int(value) / 1000 if isinstance(value, str) and value.isdigit() else None


def from_rpc_error(e: grpc.RpcError, request_id: str | None = None) -> DGServeClientError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    if request_id is None and hasattr(e, "trailing_metadata"):
        request_id = dict(e.trailing_metadata() or ()).get("x-request-id")
    return BY_CODE.get(code, DGServeClientError)(code, details or "", request_id, pushback_s(e))
