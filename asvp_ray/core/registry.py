"""A registry and a factory per extension point (strategies, oracles, sources, ...).

Usage::

    STRATEGIES = Registry("strategy")

    @STRATEGIES.register("margin")
    class Margin(Strategy): ...

    STRATEGIES.create("margin", **kwargs)
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, Generic, List, TypeVar

from asvp_ray.core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories (classes or functions) for one extension point.

    Args:
        kind: what is registered, used in error messages ("strategy", "oracle").
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator that registers a factory under ``name``."""

        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = factory
            return factory

        return deco

    def names(self) -> List[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered as ``name``.

        Raises:
            ConfigError: no such name; the message lists the valid ones and the closest.
        """
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}.{hint} Valid {self.kind} names: {', '.join(self.names())}"
            ) from None

    def create(self, name: str, **kwargs: Any) -> T:
        """Build the object registered as ``name`` with keyword arguments."""
        return self.get(name)(**kwargs)
