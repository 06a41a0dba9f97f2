"""What every config section's checks share: the error a user can fix, and the small checks
that name the key."""
from __future__ import annotations

import re
from typing import Any

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,79}")   # config and model names


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key."""


def choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} = {value!r} is not one of {', '.join(map(repr, allowed))}")


def positive(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        raise ConfigError(f"{name} = {value!r} must be {'>= 0' if allow_zero else '> 0'}")
