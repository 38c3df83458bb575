"""Errors of the HTTP API in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, with the status
code the engine's code maps to, and `Retry-After` on the answers that say "come back later"."""

from __future__ import annotations

import math

from pydantic import ValidationError

from dgserve.model.errors import ConfigError, DGServeError, InputError

from ...engine.errors import Code, EngineError

STATUS = {Code.INVALID_ARGUMENT: 400, Code.OUT_OF_RANGE: 400, Code.RESOURCE_EXHAUSTED: 429,
          Code.DEADLINE_EXCEEDED: 504, Code.CANCELLED: 499, Code.UNAVAILABLE: 503, Code.INTERNAL: 500}
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         413: "invalid_request_error", 429: "rate_limit_error", 499: "cancelled", 503: "service_unavailable",
         504: "timeout", 500: "internal_error"}
RENAMED = {"sampler.max_new_tokens": "max_tokens", "token_ids": "prompt"}  # engine fields by their HTTP names


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s

    def body(self, request_id: str | None = None) -> dict:
        message = f"request {request_id}: {self.message}" if request_id else self.message
        return {"error": {"message": message, "type": TYPES.get(self.status, "error"), "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(0, math.ceil(self.retry_after_s)))}


def http_param(field: str) -> str:
    """An engine or chat-core field name as the HTTP body names it (`sampler.t_max` -> `t_max`)."""
    if field in RENAMED:
        return RENAMED[field]
    return field.removeprefix("sampler.")


def from_error(e: DGServeError, retry_after_s: float) -> ApiError:
    """A refusal before the request reached a unit: a bad field, or a busy tokenizer."""
    if isinstance(e, InputError):
        param = http_param(e.field)
        return ApiError(400, f"{param}:{str(e).split(':', 1)[1]}" if param != e.field else str(e), param)
    if isinstance(e, ConfigError):
        return ApiError(400, str(e), http_param(e.field))
    if isinstance(e, EngineError):
        return from_code(e.code, str(e), retry_after_s)
    return ApiError(400, str(e))


def from_code(code: Code, message: str, retry_after_s: float) -> ApiError:
    status = STATUS.get(code, 500)
    retry = retry_after_s if status in (429, 503) else None
    return ApiError(status, message, code=code.value.lower(), retry_after_s=retry)


def from_validation(e: ValidationError) -> ApiError:
    """The first problem pydantic found, naming the field as `messages[0].role` / `stream_options.include_usage`."""
    err = e.errors(include_url=False)[0]
    if "__unsupported__:" in err["msg"]:  # the schema's own checks: "__unsupported__:<field>:<why>"
        param, _, why = err["msg"].split("__unsupported__:", 1)[1].partition(":")
        return ApiError(400, f"{param}: {why}", param)
    param = ""
    for part in err["loc"]:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    if err["type"] == "extra_forbidden":
        return ApiError(400, f"{param}: unknown field (see GET /v1/models and the README for the fields this server "
                             f"takes)", param or None)
    return ApiError(400, f"{param}: {err['msg']}" if param else err["msg"], param or None)
