"""What guards the gateway's gRPC server: API keys, TLS credentials, and two interceptors.

1. Health (`grpc.health.v1.Health`) stays open, so probes need no secret; every other method needs
   `authorization: Bearer <key>` once keys are configured, else UNAUTHENTICATED.
2. Keys are compared in constant time: each is kept only as its SHA-256 digest, and a presented key is checked
   against every digest with `hmac.compare_digest`, without stopping at the first match.
3. A key file (a mounted Kubernetes Secret) is read again when it changes, so keys rotate without a restart; a
   file that disappears or becomes empty keeps the last good keys and says so in the log.
4. Bytes that are not a valid message of the method's type get INVALID_ARGUMENT (gRPC's own decoder would give
   UNKNOWN): requests are decoded inside the handler, where the failure can be answered.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import os
import time
from pathlib import Path

import grpc

from dgserve.model.errors import ConfigError

log = logging.getLogger("dgserve.gateway")

OPEN_METHODS = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")
RELOAD_EVERY_S = 1.0


def _read(path: str, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"gateway.{field}", path, f"a readable file ({e.strerror})", "topology") from e


def _parse_keys(text: str) -> list[str]:
    """Keys separated by newlines or commas; blank lines and `#` comments are skipped."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        out.extend(k.strip() for k in line.split(",") if k.strip())
    return out


class ApiKeys:
    """The accepted keys, from a file and/or an environment variable."""

    def __init__(self, file: str | None, env: str | None, clock=time.monotonic):
        self.file, self.env, self.clock = file, env, clock
        self._mtime: float | None = None
        self._checked = float("-inf")
        self._digests: list[bytes] = []
        self._load(initial=True)

    def _load(self, initial: bool = False) -> None:
        keys = []
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None and initial:
                raise ConfigError("gateway.api_keys_env", self.env, "an environment variable that is set",
                                  "topology")
            keys += _parse_keys(value or "")
        if self.file is not None:
            try:
                mtime = os.stat(self.file).st_mtime
                keys += _parse_keys(_read(self.file, "api_keys_file").decode("utf-8", "replace"))
                self._mtime = mtime
            except (OSError, ConfigError) as e:
                if initial and isinstance(e, OSError):
                    raise ConfigError("gateway.api_keys_file", self.file, f"a readable file ({e.strerror})",
                                      "topology") from e
                if initial:
                    raise
                log.warning("API keys: %s cannot be read; keeping the last good keys", self.file)
                return
        if not keys:
            if initial:
                raise ConfigError("gateway.api_keys_file" if self.file else "gateway.api_keys_env",
                                  self.file or self.env, "at least one key (with none, every call is refused)",
                                  "topology")
            log.warning("API keys: %s holds no key; keeping the last good keys", self.file)
            return
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        if not initial:
            log.info("API keys: reloaded %d key(s) from %s", len(keys), self.file)

    def _maybe_reload(self) -> None:
        now = self.clock()
        if self.file is None or now - self._checked < RELOAD_EVERY_S:
            return
        self._checked = now
        try:
            changed = os.stat(self.file).st_mtime != self._mtime
        except OSError:
            changed = True
        if changed:
            self._load()

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, key: str) -> bool:
        self._maybe_reload()
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found = False
        for d in self._digests:
            found |= hmac.compare_digest(digest, d)
        return found


def tenant_of(key: str | None) -> str:
    """The tenant of a caller (whose cached prompt prefixes it may share): a digest of its API key, never the key
    itself; callers that send no key share one tenant, ""."""
    if key is None:
        return ""
    return hashlib.sha256(b"dgserve-tenant\0" + key.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def bearer_key(metadata) -> str | None:
    """The key of an `authorization: Bearer <key>` header, or None."""
    for name, value in metadata or ():
        if name == "authorization" and isinstance(value, str):
            scheme, _, key = value.strip().partition(" ")
            if scheme.lower() == "bearer" and key.strip():
                return key.strip()
    return None


def server_credentials(settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the gateway settings (None without TLS); client certificates are required when a
    client CA is given."""
    if not settings.tls:
        return None
    cert, key = _read(settings.tls_cert_file, "tls_cert_file"), _read(settings.tls_key_file, "tls_key_file")
    ca = _read(settings.tls_client_ca_file, "tls_client_ca_file") if settings.tls_client_ca_file else None
    try:
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
    except Exception as e:  # grpc checks only that the PEM is present; a bad one fails at bind
        raise ConfigError("gateway.tls_cert_file", settings.tls_cert_file, f"a PEM certificate and key ({e})",
                          "topology") from e


# -- interceptors ----------------------------------------------------------------------------------------------
def _with_behavior(handler: grpc.RpcMethodHandler, wrap) -> grpc.RpcMethodHandler:
    """The same method with its behaviour replaced by `wrap(kind, behaviour, deserializer)`; requests then arrive
    as raw bytes."""
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behavior = getattr(handler, kind)
        if behavior is not None:
            return handler._replace(request_deserializer=None,
                                    **{kind: wrap(kind, behavior, handler.request_deserializer)})
    return handler


def _decoder(deserializer):
    async def decode(raw, context):
        if deserializer is None:
            return raw
        try:
            return deserializer(raw)
        except Exception as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid protobuf message of this method's type "
                                f"({type(e).__name__}: {str(e)[:200]})")
    return decode


def _decoding(kind: str, behavior, deserializer):
    """`behavior` fed with decoded requests; a decoding failure aborts the call with INVALID_ARGUMENT."""
    decode = _decoder(deserializer)

    async def decoded(raw_iterator, context):
        async for raw in raw_iterator:
            yield await decode(raw, context)

    async def request_of(raw, context):
        return await decode(raw, context) if kind.startswith("unary") else decoded(raw, context)

    if not kind.endswith("stream") or not inspect.isasyncgenfunction(behavior):
        async def respond(raw, context):  # one response, or a stream written with context.write
            return await behavior(await request_of(raw, context), context)
        return respond

    async def respond_stream(raw, context):
        async for msg in behavior(await request_of(raw, context), context):
            yield msg
    return respond_stream


class StrictDecoding(grpc.aio.ServerInterceptor):
    """Malformed request bytes -> INVALID_ARGUMENT (gRPC's default is UNKNOWN)."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        return None if handler is None else _with_behavior(handler, _decoding)


class ApiKeyAuth(grpc.aio.ServerInterceptor):
    """Every method but health needs a valid `authorization: Bearer <key>`."""

    def __init__(self, keys: ApiKeys):
        self.keys = keys

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method in OPEN_METHODS:
            return handler
        key = bearer_key(details.invocation_metadata)
        if key is not None and self.keys.accepts(key):
            return handler
        why = "no API key was sent" if key is None else "the API key is not valid"
        return _with_behavior(handler, lambda _kind, _behavior, _deserializer: _refuse(why))


def _refuse(why: str):
    """A behaviour that refuses the call; a coroutine serves every method kind (streams may write, or not)."""
    message = f"{why}: send the metadata 'authorization: Bearer <key>'"

    async def abort(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
    return abort
