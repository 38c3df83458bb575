"""The FastAPI app of the HTTP API: routes, API keys, body limits, and every error in OpenAI's shape.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /v1/models/{id}, GET /health.
`/health` is open (probes need no secret); the rest need `Authorization: Bearer <key>` once the gateway has
keys. A body is refused above the gateway's request limit before it is read whole, and is parsed and checked
before anything is tokenized."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from ..front import request_id
from ..security import ApiKeys, bearer_key, tenant_of
from . import responses as out
from .errors import ApiError, from_validation
from .schema import ChatCompletionRequest, CompletionRequest
from .service import OpenAIService

log = logging.getLogger("dgserve.http")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def make_app(service: OpenAIService, keys: ApiKeys | None = None) -> FastAPI:
    app = FastAPI(title="dgserve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        rid = getattr(request.state, "request_id", None)
        return JSONResponse(e.body(rid), e.status, headers={**e.headers(), **_rid_header(rid)})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # unknown route, wrong method
        code = "not_found" if e.status_code == 404 else "method_not_allowed" if e.status_code == 405 else None
        err = ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code)
        return JSONResponse(err.body(), e.status_code, headers=dict(e.headers or {}))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        request.state.request_id = request_id(request.headers.get("x-request-id"))
        key = bearer_key(request.headers.items())
        request.state.tenant = tenant_of(key)  # whose cached prompt prefixes the request may share
        if keys is not None and request.url.path != "/health" and (key is None or not keys.accepts(key)):
            why = "no API key was sent" if key is None else "the API key is not valid"
            err = ApiError(401, f"{why}: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")
            return JSONResponse(err.body(), 401, headers={"WWW-Authenticate": "Bearer", **_rid_header(
                request.state.request_id)})
        response = await call_next(request)
        response.headers.update(_rid_header(request.state.request_id))
        return response

    @app.get("/health")
    async def health():
        ok, why = await service.serving()
        return JSONResponse({"status": "serving" if ok else "not_serving", "why": why}, 200 if ok else 503)

    @app.get("/v1/models")
    async def list_models():
        return out.models(service.model_id, service.created, service.front.limits.context_length)

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != service.model_id:
            raise ApiError(404, f"model {model_id!r} is not served here; this server serves {service.model_id!r}",
                           "model", "model_not_found")
        return out.model(service.model_id, service.created, service.front.limits.context_length)

    async def answer(request: Request, schema, unary, stream):
        body = _parse(schema, await read_json(request, service.front.limits.max_request_bytes))
        rid, tenant = request.state.request_id, request.state.tenant
        if body.stream:  # the stream's first event is awaited first: a refusal still gets its status code
            return StreamingResponse(await stream(body, rid, tenant), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return await unary(body, rid, tenant)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, ChatCompletionRequest, service.chat, service.chat_stream)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, CompletionRequest, service.complete, service.complete_stream)

    return app


def _rid_header(rid: str | None) -> dict[str, str]:
    return {"x-request-id": rid} if rid else {}


def _parse(model, raw):
    if not isinstance(raw, dict):
        raise ApiError(400, f"the body must be a JSON object, not {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise from_validation(e) from None


async def read_json(request: Request, limit: int):
    """The body as JSON; refused above `limit` bytes before it is read whole (413)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(413, f"the body of {declared} bytes exceeds the limit of {limit} bytes "
                            f"(gateway.max_message_bytes)", code="request_too_large")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, f"the body exceeds the limit of {limit} bytes (gateway.max_message_bytes)",
                           code="request_too_large")
    if request.headers.get("content-type", "application/json").split(";")[0].strip() not in (
            "application/json", ""):
        raise ApiError(400, "the body must be JSON (Content-Type: application/json)", code="invalid_content_type")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError: not UTF-8
        raise ApiError(400, f"the body is not valid JSON ({type(e).__name__}: {str(e)[:200]})",
                       code="invalid_json") from None
