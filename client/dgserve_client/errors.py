"""Typed client errors, one per gRPC status the server uses; each carries the request id."""

from __future__ import annotations

import grpc


class DGServeClientError(Exception):
    retriable = False

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str | None = None):
        self.code, self.message, self.request_id = code, message, request_id
        rid = f" [request {request_id}]" if request_id else ""
        super().__init__(f"{code.name}: {message}{rid}")


class InvalidArgument(DGServeClientError):
    pass


class ResourceExhausted(DGServeClientError):
    retriable = True


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
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def from_rpc_error(e: grpc.RpcError, request_id: str | None = None) -> DGServeClientError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    if request_id is None and hasattr(e, "trailing_metadata"):
        request_id = dict(e.trailing_metadata() or ()).get("x-request-id")
    return BY_CODE.get(code, DGServeClientError)(code, details or "", request_id)
