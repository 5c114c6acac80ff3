"""Search spaces written in YAML, validated against ``Config``, turned into a Ray Tune ``param_space``.

A space file maps config keys to distributions. Keys are dotted paths (``proxy.lr``) or nested
sections (``proxy: {lr: ...}``); any key of ``Config`` works, including sections added later,
because every key and value is checked by loading the base config with that value set::

    strategy: {grid: [margin, entropy]}          # every value, in every combination (grid search)
    proxy:
      hidden: {choice: [64, 256]}                # one value drawn per trial
      lr: {loguniform: [0.01, 0.3]}              # log-uniform in [low, high]
      momentum: {uniform: [0.8, 0.95]}           # uniform in [low, high]
      epochs: {randint: [10, 40]}                # an integer in [low, high], both included
    budget.schedule: {choice: [[40, 40, 40], [60, 60]]}
    proxy.normalize: l2                          # a plain value: the same in every trial

A mapping is a distribution when its key names one (exactly one key). Everything else is a
section (a mapping) or a constant (a scalar or a list).
"""
from __future__ import annotations

import copy
import difflib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

from pydantic import BaseModel

from asvp_ray.config import Config, load_config, model_of, read_yaml, set_key  # noqa: F401  (set_key: used by study)
from asvp_ray.core.errors import ConfigError

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
# Keys a study sets itself for every trial.
RESERVED = {"feature_cache": "the study sets feature_cache to DIR/feature_cache for every trial"}
# Config sections whose values decide the features v0 (the feature cache key).
FEATURE_SECTIONS = ("data", "backbone")


@dataclass(frozen=True)
class Param:
    """One searched key.

    Attributes:
        key: dotted config key, e.g. ``proxy.lr``.
        kind: one of ``DISTRIBUTIONS``.
        args: the values (grid, choice) or ``[low, high]`` (uniform, loguniform, randint).
    """

    key: str
    kind: str
    args: Tuple[Any, ...]

    def domain(self):
        """The Ray Tune domain of this parameter."""
        from ray import tune

        a = list(self.args)
        if self.kind == "grid":
            return tune.grid_search(a)
        if self.kind == "choice":
            return tune.choice(a)
        if self.kind == "uniform":
            return tune.uniform(a[0], a[1])
        if self.kind == "loguniform":
            return tune.loguniform(a[0], a[1])
        return tune.randint(a[0], a[1] + 1)  # Tune's upper bound is exclusive; ours is included

    @property
    def discrete(self) -> bool:
        return self.kind in ("grid", "choice")

    def samples(self) -> List[Any]:
        """Values that stand for the whole range when validating: every value, or both ends."""
        return list(self.args)


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space.

    Attributes:
        params: searched keys, in file order.
        constants: keys set to the same value in every trial.
        origin: where it came from (for messages).
    """

    params: Tuple[Param, ...]
    constants: Dict[str, Any] = field(default_factory=dict)
    origin: str = "search space"

    def param_space(self) -> Dict[str, Any]:
        """``{dotted key: Tune domain}``, for ``Tuner(param_space=...)``."""
        return {p.key: p.domain() for p in self.params}

    @property
    def keys(self) -> List[str]:
        return [p.key for p in self.params]

    @property
    def grid_size(self) -> int:
        """Trials per sample: the product of the grid sizes."""
        n = 1
        for p in self.params:
            if p.kind == "grid":
                n *= len(p.args)
        return n

    def trial_raw(self, base: Dict[str, Any], values: Dict[str, Any]) -> Dict[str, Any]:
        """The base config dict with the constants and one trial's values set."""
        raw = copy.deepcopy(base)
        for key, value in list(self.constants.items()) + list(values.items()):
            raw = set_key(raw, key, value)
        return raw

    def feature_combinations(self) -> Tuple[List[Dict[str, Any]], List[str]]:
        """Every combination of the searched keys that decide the features (``data.*``,
        ``backbone.*``), so that a study can extract each once before its trials start.

        Returns:
            (combinations as {key: value} dicts, continuous feature keys that cannot be enumerated).
        """
        feat = [p for p in self.params if p.key.split(".")[0] in FEATURE_SECTIONS]
        discrete = [p for p in feat if p.discrete]
        combos = [dict(zip([p.key for p in discrete], vals)) for vals in
                  itertools.product(*[p.args for p in discrete])]
        return combos, [p.key for p in feat if not p.discrete]

    def to_yaml_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {k: v for k, v in self.constants.items()}
        for p in self.params:
            out[p.key] = {p.kind: list(p.args)}
        return out


# ---------------------------------------------------------------------------------- parsing
def _kind_of_path(parts: Sequence[str]) -> str:
    """``section`` (a pydantic model), ``value`` (a leaf field) or ``unknown``, walking ``Config``."""
    model: Optional[Type[BaseModel]] = Config
    for i, part in enumerate(parts):
        if model is None:
            return "value"
        f = model.model_fields.get(part)
        if f is None:
            return "unknown"
        model = model_of(f.annotation)
    return "section" if model is not None else "value"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _parse_dist(key: str, kind: str, args: Any, origin: str) -> Param:
    where = f"{origin}: '{key}'"
    if kind in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {kind} needs a non-empty list of values, e.g. {{{kind}: [margin, entropy]}} "
                              f"(got {args!r})")
        return Param(key, kind, tuple(args))
    example = {"uniform": "[0.8, 0.95]", "loguniform": "[0.001, 0.3]", "randint": "[10, 40]"}[kind]
    if not isinstance(args, list) or len(args) != 2 or not all(_is_number(a) for a in args):
        raise ConfigError(f"{where}: {kind} needs [low, high] numbers, e.g. {{{kind}: {example}}} (got {args!r})")
    lo, hi = args
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}: randint needs integer bounds, e.g. {{randint: {example}}} (got {args!r})")
    if not lo < hi:
        raise ConfigError(f"{where}: {kind} needs low < high (got low={lo!r}, high={hi!r})")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs 0 < low < high (got low={lo!r}); use uniform for ranges "
                          "that include 0 or negative values")
    return Param(key, kind, (lo, hi))


def _walk(node: Dict[str, Any], prefix: List[str], origin: str, params: List[Param],
          constants: Dict[str, Any]) -> None:
    for k, v in node.items():
        if not isinstance(k, str) or not k:
            raise ConfigError(f"{origin}: keys must be non-empty strings (got {k!r})")
        parts = prefix + k.split(".")
        key = ".".join(parts)
        path_kind = _kind_of_path(parts)
        if isinstance(v, dict):
            names = [n for n in v if isinstance(n, str)]
            dists = [n for n in names if n in DISTRIBUTIONS]
            if dists:
                if len(v) != 1:
                    raise ConfigError(f"{origin}: '{key}': a distribution has exactly one key, e.g. "
                                      f"{{{dists[0]}: [...]}}; got keys {list(v)}")
                params.append(_parse_dist(key, dists[0], v[dists[0]], origin))
                continue
            if path_kind == "value" and len(v) == 1:
                # A leaf key takes a distribution (or a plain value), so this is a misspelt distribution.
                name = str(next(iter(v)))
                close = difflib.get_close_matches(name, DISTRIBUTIONS, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"{origin}: '{key}': unknown distribution '{name}'.{hint} "
                                  f"Use one of: {', '.join(DISTRIBUTIONS)}")
            if path_kind in ("section", "unknown"):
                _walk(v, parts, origin, params, constants)
                continue
        constants[key] = v


def parse_space(spec: Union[str, Path, Dict[str, Any]], base: Union[Config, Dict[str, Any], None] = None,
                origin: Optional[str] = None) -> SearchSpace:
    """Read and validate a search space.

    Args:
        spec: a YAML file, or the already-loaded mapping.
        base: the base config every trial starts from (default: the defaults). Each searched
            key is validated by loading it with that key set to sample values: every grid or
            choice value, both ends of a range.
        origin: a name for messages (default: the file name).

    Returns:
        The ``SearchSpace``.

    Raises:
        ConfigError: a missing file, bad YAML, an unknown distribution or bad arguments, an unknown
            config key (with the nearest valid one), a value the config refuses, or a key the
            study sets itself.
    """
    if isinstance(spec, (str, Path)):
        origin = origin or str(Path(spec))
        spec = read_yaml(spec, what="search space", example="examples/space.yaml")
    origin = origin or "search space"
    if not isinstance(spec, dict):
        raise ConfigError(f"{origin}: the top level must map config keys to distributions, e.g. "
                          f"'strategy: {{grid: [margin, entropy]}}' (got {type(spec).__name__})")
    params: List[Param] = []
    constants: Dict[str, Any] = {}
    _walk(spec, [], origin, params, constants)
    if not params:
        raise ConfigError(f"{origin}: no key is searched; give at least one distribution, e.g. "
                          "'strategy: {grid: [margin, entropy]}' (distributions: " + ", ".join(DISTRIBUTIONS) + ")")
    seen = set()
    for p in params:
        if p.key in seen or p.key in constants:
            raise ConfigError(f"{origin}: '{p.key}' is given twice")
        seen.add(p.key)
    for key in [p.key for p in params] + list(constants):
        top = key.split(".")[0]
        if top in RESERVED:
            raise ConfigError(f"{origin}: '{key}' cannot be searched: {RESERVED[top]}")
        for other in seen | set(constants):
            if other != key and other.startswith(key + "."):
                raise ConfigError(f"{origin}: '{key}' and '{other}' overlap; search the section or its keys, not both")

    if base is None:
        base_raw: Dict[str, Any] = Config().model_dump(mode="json")
    elif isinstance(base, Config):
        base_raw = base.model_dump(mode="json")
    else:
        base_raw = dict(base)
    space = SearchSpace(params=tuple(params), constants=constants, origin=origin)
    with_constants = space.trial_raw(base_raw, {})
    _validate(with_constants if constants else base_raw, {k: [v] for k, v in constants.items()}, origin)
    _validate(with_constants, {p.key: p.samples() for p in params}, origin)
    return space


def _validate(base_raw: Dict[str, Any], samples: Dict[str, List[Any]], origin: str) -> None:
    for key, values in samples.items():
        parts = key.split(".")
        for i in range(1, len(parts)):
            if _kind_of_path(parts[:i]) == "value":
                head = ".".join(parts[:i])
                raise ConfigError(f"{origin}: '{key}': '{head}' is a value, not a section, so '{key}' does not "
                                  f"exist; search '{head}' itself")
        for v in values:
            try:
                load_config(raw=set_key(base_raw, key, v))
            except ConfigError as e:
                msg = str(e)
                if msg.startswith("config: "):
                    msg = msg[len("config: "):]
                raise ConfigError(f"{origin}: '{key}' = {json.dumps(v)}: {msg}") from None
