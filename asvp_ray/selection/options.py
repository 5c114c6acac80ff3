"""Strategies built from a config: ``strategy: {name: coreset, metric: cosine, execution: sharded}``.

A strategy's options are its constructor's keyword arguments. Score-based strategies (margin,
entropy, least_confidence) have none of their own but take the execution switches
(``execution``, ``num_shards``, ``shard_min_rows``, ``actor_options``): with any of them set they
run through :class:`~asvp_ray.selection.sharded.ShardedStrategy`. Options are checked when the
config loads, with the same "did you mean" errors as config keys.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Dict, Mapping, Optional, Tuple

from asvp_ray.core.errors import AsvpError, ConfigError
from asvp_ray.selection.base import STRATEGIES, ScoreStrategy, Strategy
from asvp_ray.selection.sharded import ShardedStrategy

#: the execution switches every strategy that can shard takes (see ExecutionOptions)
EXECUTION_KEYS = ("execution", "num_shards", "shard_min_rows", "actor_options")


def _is_score_strategy(factory: Any) -> bool:
    return isinstance(factory, type) and issubclass(factory, ScoreStrategy)


def _parameters(name: str) -> Dict[str, inspect.Parameter]:
    factory = STRATEGIES.get(name)
    params = {p.name: p for p in inspect.signature(factory).parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if _is_score_strategy(factory):
        params.update({p.name: p for p in inspect.signature(ShardedStrategy).parameters.values()
                       if p.name in EXECUTION_KEYS})
    return params


def _allows_none(p: inspect.Parameter) -> bool:
    return p.default is None or "Optional" in str(p.annotation) or "None" in str(p.annotation)


def option_defaults(name: str) -> Dict[str, Any]:
    """The options strategy ``name`` takes, with their defaults (``inspect.Parameter.empty``
    for a required one).

    Raises:
        ConfigError: no strategy of that name.
    """
    return {k: p.default for k, p in _parameters(name).items()}


def strategy_options_help(name: str) -> str:
    """One line per option of strategy ``name``: ``key (default)``."""
    opts = option_defaults(name)
    if not opts:
        return f"{name}: no options"
    return f"{name}: " + ", ".join(f"{k}={v!r}" for k, v in opts.items())


def build_strategy(name: str, options: Optional[Mapping[str, Any]] = None) -> Strategy:
    """Strategy ``name`` with ``options``, checked.

    Raises:
        ConfigError: an unknown strategy or option (with the closest valid name and the list of
            valid ones), or a value the strategy refuses (naming the strategy and the value).
    """
    options = dict(options or {})
    factory = STRATEGIES.get(name)
    valid = option_defaults(name)
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(str(key), list(valid), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            listing = ", ".join(valid) if valid else "none"
            raise ConfigError(f"unknown option {key!r} for strategy {name!r}.{hint} Options of {name}: {listing} "
                              f"(write them as strategy: {{name: {name}, OPTION: VALUE}})")
    params = _parameters(name)
    for key, value in options.items():
        if value is None and _allows_none(params[key]):
            continue
        _check_type(name, key, value, valid[key])
    try:
        if _is_score_strategy(factory):
            execution = {k: options.pop(k) for k in EXECUTION_KEYS if k in options}
            strategy = factory(**options)
            if execution:
                strategy = ShardedStrategy(strategy, **execution)
        else:
            strategy = factory(**options)
        if hasattr(strategy, "exec_options"):
            strategy.exec_options.check(name)
    except ConfigError:
        raise
    except (AsvpError, TypeError, ValueError) as e:
        raise ConfigError(f"strategy {name!r} refused its options {dict(options)}: {e}") from None
    return strategy


def _check_type(name: str, key: str, value: Any, default: Any) -> None:
    """An option whose default is a bool, number or string takes a value of that kind (None only
    where the default is None); the strategy's own checks see the rest."""
    kinds = [(bool, "true or false"), (int, "an integer"), (float, "a number"), (str, "a string")]
    for kind, words in kinds:
        if isinstance(default, kind) and default is not None:
            ok = isinstance(value, bool) if kind is bool else (
                not isinstance(value, bool) and (isinstance(value, (int, float)) if kind is float
                                                 else isinstance(value, kind)))
            if not ok:
                raise ConfigError(f"strategy {name!r}: option {key}={value!r} must be {words} "
                                  f"(the default is {default!r})")
            return


def split_strategy(value: Any) -> Tuple[str, Dict[str, Any]]:
    """``(name, options)`` of a config's ``strategy`` value: a name, or a mapping with ``name``.

    Raises:
        ConfigError: a mapping without ``name``, or a value of another type.
    """
    if isinstance(value, str):
        return value, {}
    if isinstance(value, Mapping):
        rest = dict(value)
        if "name" not in rest:
            raise ConfigError(f"strategy: {dict(value)} has no 'name'; write strategy: {{name: coreset, ...options}} "
                              "or strategy: margin")
        return rest.pop("name"), rest
    raise ConfigError(f"strategy must be a name (strategy: margin) or a mapping (strategy: {{name: coreset, "
                      f"metric: cosine}}), got {type(value).__name__} {value!r}")
