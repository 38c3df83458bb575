"""Typed messages between the gateway, the engine units and their rank 0 (plain data, picklable)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dgserve.model.errors import ConfigError, DGServeError, InputError
from dgserve.model.settings import SamplerSettings

from .engine.errors import Code, EngineError
from .engine.events import Failed


@dataclass(frozen=True)
class GenerateRequest:
    """A request as a unit receives it: token ids and per-request knobs (None: the deployment's defaults)."""

    prompt_ids: tuple[int, ...]
    seed: int = 0
    sampler: dict = field(default_factory=dict)  # any SamplerSettings knob
    drafts: bool = False
    timeout_s: float | None = None
    request_id: str | None = None  # the client's label (x-request-id) for logs, events and status; never a handle
    tenant: str = ""  # set by the gateway from the caller's API key: who may share cached prompt prefixes
    media: tuple = ()  # the prompt's images and video frames, processed by the gateway (model.media.MediaItem)

    def to_engine(self, defaults, overrides: dict):
        """Validated engine request (an EngineRequest, on rank 0): checkpoint defaults, then the deployment's
        overrides, then the request's."""
        from .engine.engine import EngineRequest

        if not isinstance(self.sampler, dict):
            raise InputError("sampler", "must be a mapping of sampler knobs")
        try:
            settings = SamplerSettings.from_defaults(defaults, **{**overrides, **self.sampler})
        except ConfigError as e:
            raise InputError(e.field, f"{e.value!r} is not allowed; allowed: {e.allowed}") from e
        return EngineRequest(list(self.prompt_ids), settings, self.seed, self.drafts, self.timeout_s,
                             self.request_id, self.tenant, tuple(self.media))


def failure_event(error: Exception) -> Failed:
    """The Failed event for an error raised while admitting a request."""
    if isinstance(error, EngineError):
        return Failed(error.code, str(error))
    if isinstance(error, DGServeError):  # InputError, ConfigError: the request was wrong
        return Failed(Code.INVALID_ARGUMENT, str(error))
    return Failed(Code.INTERNAL, f"{type(error).__name__}: {error}")
