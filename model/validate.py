"""One way to check a config field: predicates for the values configs hold (bools are not numbers), and
`require`, which raises a ConfigError naming the field, its value and what is allowed."""

from __future__ import annotations

from .errors import ConfigError


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def require(ok: bool, field: str, value: object, allowed: str, source: str = "config") -> None:
    if not ok:
        raise ConfigError(field, value, allowed, source)
