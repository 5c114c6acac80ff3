"""Small argument checks shared by every module (one wording for one kind of mistake)."""
from __future__ import annotations

import math
from typing import Any, Optional, Type

import numpy as np

from asvp_ray.core.errors import ConfigError


def is_int(value: Any, minimum: Optional[int] = 1) -> bool:
    """True for an integer (not a bool) of at least ``minimum`` (no bound when None)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return False
    return minimum is None or value >= minimum


def is_number(value: Any, minimum: Optional[float] = None) -> bool:
    """True for a finite int or float (not a bool) of at least ``minimum`` (no bound when None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(value) and (minimum is None or value >= minimum)


def check_int(
    where: str,
    name: str,
    value: Any,
    minimum: int = 1,
    allow_none: bool = False,
    error: Type[Exception] = ConfigError,
) -> Optional[int]:
    """``value`` as an int when it is an integer >= ``minimum`` (or None when allowed).

    Raises:
        ``error`` (default :class:`ConfigError`): "``where``: ``name``=... must be a positive
        integer" (or ">= minimum"), naming the value given.
    """
    if value is None and allow_none:
        return None
    if not is_int(value, minimum):
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        prefix = f"{where}: " if where else ""
        raise error(f"{prefix}{name}={value!r} must be {what}{' or None' if allow_none else ''}")
    return int(value)
