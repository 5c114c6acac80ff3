"""Selection over a pool whose feature rows are sharded across Ray actors (the shards themselves:
:mod:`asvp_ray.pool.shards`, :mod:`asvp_ray.pool.store_shards`).

Each shard is a contiguous block of pool rows held by one actor (spread over the cluster's
nodes), together with whatever per-row state a strategy keeps for it: coreset's
minimum-distance slice, BADGE's gradient embeddings and D^2 weights. The driver only
broadcasts small things (a new centre, a sampling target) and reduces small answers (per-shard
maxima, per-shard weight totals, per-shard top-n), so the results equal the single-process
results: the local path runs the very same shard code on one in-process shard.

Public surface:

- :class:`ShardedStrategy` wraps a score-based strategy (margin, entropy, ...): shards score
  in parallel, each returns its top-n, the driver merges them into the global top-n.
- coreset and BADGE shard themselves (``STRATEGIES.create("coreset", execution="sharded")``).
- ``execution``: ``"local"``, ``"sharded"`` or ``"auto"`` (sharded when Ray is initialised
  and the pool has at least ``shard_min_rows`` rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from asvp_ray.core.checks import check_int, is_int
from asvp_ray.core.errors import ConfigError
from asvp_ray.pool.shards import PoolShards
from asvp_ray.pool.view import PoolView
from asvp_ray.selection.base import ScoreStrategy, Strategy
from asvp_ray.selection.topn import top_n_over_shards

EXECUTIONS = ("auto", "local", "sharded")
#: ``execution="auto"`` shards pools at least this large (about 8 GB of 512-d float32 features).
DEFAULT_SHARD_MIN_ROWS = 4_000_000


# ---------------------------------------------------------------------------- configuration
@dataclass
class ExecutionOptions:
    """Where a strategy that can shard runs: one set of switches for every such strategy
    (coreset, BADGE, :class:`ShardedStrategy`).

    Args:
        execution: "local", "sharded" (Ray actors, one shard each) or "auto" (sharded when Ray
            is initialised and the pool has at least ``shard_min_rows`` rows).
        num_shards: shards when sharded; None means one per alive Ray node (at least 2).
        shard_min_rows: pool size from which "auto" shards.
        actor_options: Ray options of the shard actors (default ``{"num_cpus": 1}``).
    """

    execution: str = "auto"
    num_shards: Optional[int] = None
    shard_min_rows: int = DEFAULT_SHARD_MIN_ROWS
    actor_options: Optional[dict] = None

    def check(self, where: str) -> None:
        """Validate the switches.

        Raises:
            ConfigError: a switch is invalid; the message names the fix.
        """
        if self.execution not in EXECUTIONS:
            raise ConfigError(f"{where}: execution={self.execution!r} is not one of {', '.join(EXECUTIONS)}")
        if self.num_shards is not None and not is_int(self.num_shards):
            raise ConfigError(
                f"{where}: num_shards={self.num_shards!r} must be a positive integer or None (one per node)"
            )
        check_int(where, "shard_min_rows", self.shard_min_rows)
        if self.actor_options is not None and not isinstance(self.actor_options, dict):
            raise ConfigError(
                f"{where}: actor_options={self.actor_options!r} must be a dict of Ray actor options or None"
            )

    def resolve(self, n_rows: int) -> str:
        """``"local"`` or ``"sharded"`` for a pool of ``n_rows`` rows (see :func:`resolve_execution`)."""
        return resolve_execution(self.execution, n_rows, self.shard_min_rows)


def resolve_execution(execution: str, n_rows: int, shard_min_rows: int) -> str:
    """``"local"`` or ``"sharded"`` for a pool of ``n_rows`` rows.

    ``"auto"`` shards only when Ray is already initialised (it never starts a cluster by
    itself) and the pool has at least ``shard_min_rows`` rows.
    """
    if execution != "auto":
        return execution
    if n_rows < shard_min_rows:
        return "local"
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return "local"
    return "sharded" if ray.is_initialized() else "local"


class ShardedExecution:
    """Mixin of the strategies that can shard: the :class:`ExecutionOptions` (``self.exec_options``)
    and the cached shard actors of the current feature version (``self._shards``)."""

    exec_options: ExecutionOptions
    _shards: Optional["PoolShards"] = None

    def _init_execution(self, execution, num_shards, shard_min_rows, actor_options) -> None:
        self.exec_options = ExecutionOptions(execution, num_shards, shard_min_rows, actor_options)
        self._shards = None

    # The switches read as attributes too (``strategy.execution``), as before.
    execution = property(lambda self: self.exec_options.execution)
    num_shards = property(lambda self: self.exec_options.num_shards)
    shard_min_rows = property(lambda self: self.exec_options.shard_min_rows)
    actor_options = property(lambda self: self.exec_options.actor_options)

    def _check_exec(self) -> None:
        self.exec_options.check(self.name)

    def _resolve(self, n_rows: int) -> str:
        return self.exec_options.resolve(n_rows)

    def _pool_resolve(self, pool: PoolView) -> str:
        """``"sharded"`` for a pool whose rows live in shard actors (``pool.shards``), else what
        the execution options choose for its size."""
        return "sharded" if pool.shards is not None else self._resolve(len(pool))

    def _pool_shards(self, pool: PoolView, features: Optional[np.ndarray]):
        """The pool's own store-loaded shards when it has them (the run owns them), else this
        strategy's shard actors holding ``features``."""
        if pool.shards is not None:
            return pool.shards
        return self._actor_shards(features, len(pool))

    def _actor_shards(self, features: Optional[np.ndarray], n_rows: int) -> "PoolShards":
        """The shard actors holding ``features``, (re)built when the feature version changed."""
        shards = self._shards
        if shards is None or not shards.matches(features, n_rows):
            if shards is not None:
                shards.close()
            self._shards = PoolShards(features, n_rows, self.num_shards, self.actor_options)
        return self._shards

    #: attributes holding caches (weak references, actor handles): dropped on copy and close.
    _CACHE_ATTRS: Tuple[str, ...] = ("_shards",)

    def close(self) -> None:
        """Release cached state and shard actors (they are rebuilt on the next select)."""
        if self._shards is not None:
            self._shards.close()
        for attr in self._CACHE_ATTRS:
            setattr(self, attr, None)

    def __getstate__(self):
        # Caches hold weak references and actor handles: a copy starts without them.
        state = dict(self.__dict__)
        for attr in self._CACHE_ATTRS:
            state[attr] = None
        return state


class ShardedStrategy(ShardedExecution, Strategy):
    """Runs a score-based strategy (margin, entropy, least_confidence) over sharded pools.

    Each shard scores its rows and keeps its own top-n; the driver merges them into the global
    top-n, which equals the single-process answer (same order, same tie-breaks).

    Args:
        strategy: a :class:`ScoreStrategy`, e.g. ``STRATEGIES.create("margin")``.
        execution: "local", "sharded" or "auto" (sharded when Ray is initialised and the pool
            has at least ``shard_min_rows`` rows).
        num_shards: shards (Ray actors); None means one per alive node, at least 2.
        shard_min_rows: the pool size from which "auto" shards.
        actor_options: Ray actor options for the shard actors (default ``{"num_cpus": 1}``).
    """

    def __init__(
        self,
        strategy: Strategy,
        execution: str = "auto",
        num_shards: Optional[int] = None,
        shard_min_rows: int = DEFAULT_SHARD_MIN_ROWS,
        actor_options: Optional[dict] = None,
    ):
        self.strategy = strategy
        self._init_execution(execution, num_shards, shard_min_rows, actor_options)

    @property
    def name(self) -> str:  # type: ignore[override]
        return getattr(self.strategy, "name", "strategy")

    def _select_positions(self, pool: PoolView, n: int, rng: np.random.Generator) -> np.ndarray:
        if not isinstance(self.strategy, ScoreStrategy):
            raise ConfigError(
                f"ShardedStrategy wraps score-based strategies (margin, entropy, least_confidence), "
                f"got {type(self.strategy).__name__}; coreset and badge shard themselves: "
                f"STRATEGIES.create('coreset', execution='sharded')"
            )
        self.exec_options.check("ShardedStrategy")
        if self._pool_resolve(pool) == "local":
            return self.strategy._select_positions(pool, n, rng)
        # Precomputed probabilities win over the model, so shards then need no features.
        feats = pool.features if pool.probs is None else None
        return top_n_over_shards(self._pool_shards(pool, feats).group, pool, self.strategy, n)

    def __repr__(self) -> str:
        return f"ShardedStrategy({self.strategy!r}, execution={self.execution!r}, num_shards={self.num_shards!r})"
