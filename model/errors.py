"""Errors raised by the model package; each names what was wrong and what was allowed."""


class DGServeError(ValueError):
    """Base class for user-facing errors (bad config, bad checkpoint, bad request)."""


class ConfigError(DGServeError):
    def __init__(self, field: str, value: object, allowed: str, source: str = "config"):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{source}: invalid {field}={value!r}; allowed: {allowed}")


class CheckpointError(DGServeError):
    """A checkpoint is missing, incomplete, or holds a tensor of the wrong shape."""


class InputError(DGServeError):
    """A request input is invalid (field named in the message)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")
