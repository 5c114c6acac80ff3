"""The strategy base classes and their registry.

A strategy has one public method, ``select(pool, n, rng) -> ids``, where ``pool`` is a
:class:`~asvp_ray.pool.view.PoolView`. The base class validates the request and the answer; a
subclass implements one hook. Score-based strategies supply only ``score(probs)`` and inherit a
chunked, memory-bounded running top-n (:mod:`asvp_ray.selection.topn`).
"""
from __future__ import annotations

import abc
from typing import Any

import numpy as np

from asvp_ray.core.checks import is_int
from asvp_ray.core.errors import AsvpError, BadInputError, EmptyPoolError, PoolExhaustedError
from asvp_ray.core.registry import Registry
from asvp_ray.pool.view import PoolView
from asvp_ray.selection.topn import running_top_n, top_n_over_shards

STRATEGIES: Registry["Strategy"] = Registry("strategy")


def _check_n(n: Any) -> int:
    if not is_int(n):
        raise BadInputError(f"n (samples to select) must be a positive integer, got {n!r}")
    return int(n)


class Strategy(abc.ABC):
    """A query strategy: picks which unlabelled samples to label next.

    Subclasses implement :meth:`_select_positions`; :meth:`select` validates the request
    and the answer and maps row positions to pool ids.
    """

    #: registry name, set by subclasses (used in messages).
    name: str = "strategy"

    def select(self, pool: PoolView, n: int, rng: np.random.Generator) -> np.ndarray:
        """Choose ``n`` unlabelled samples.

        Args:
            pool: what the strategy may see of the pool.
            n: number of samples to select.
            rng: random generator; the only source of randomness.

        Returns:
            int64 (n,) pool ids (``pool.ids`` values, not row positions), distinct and all
            unlabelled, most informative first for score-based strategies.

        Raises:
            BadInputError: ``n`` is not a positive integer, ``rng`` is not a numpy Generator,
                or the pool lacks what the strategy needs.
            EmptyPoolError: every sample of the pool is labelled.
            PoolExhaustedError: ``n`` exceeds the number of unlabelled samples.
        """
        if not isinstance(pool, PoolView):
            raise BadInputError(f"{self.name}.select: pool must be a PoolView, got {type(pool).__name__}")
        n = _check_n(n)
        if not isinstance(rng, np.random.Generator):
            raise BadInputError(
                f"{self.name}.select: rng must be a numpy.random.Generator "
                f"(np.random.default_rng(seed)), got {type(rng).__name__}"
            )
        available = pool.n_unlabeled
        if available == 0:
            raise EmptyPoolError(
                f"{self.name}.select: the pool has no unlabelled samples left (all {len(pool)} "
                f"are labelled); stop the loop or add samples to the pool"
            )
        if n > available:
            raise PoolExhaustedError(
                f"{self.name}.select: asked for {n} samples but only {available} are unlabelled; "
                f"lower the round budget to at most {available}"
            )
        pos = np.asarray(self._select_positions(pool, n, rng))
        self._check_answer(pool, pos, n)
        return pool.ids[pos]

    def _check_answer(self, pool: PoolView, pos: np.ndarray, n: int) -> None:
        # A wrong answer here is a bug in the strategy, not in the caller's input.
        if pos.shape != (n,) or not np.issubdtype(pos.dtype, np.integer):
            raise AsvpError(f"strategy {self.name!r} returned {pos.dtype} {pos.shape}; expected {n} integer positions")
        if n and (pos.min() < 0 or pos.max() >= len(pool)):
            raise AsvpError(f"strategy {self.name!r} returned positions outside [0, {len(pool)})")
        if len(np.unique(pos)) != n:
            raise AsvpError(f"strategy {self.name!r} returned duplicate positions")
        if pool.labeled_mask[pos].any():
            raise AsvpError(f"strategy {self.name!r} returned already-labelled samples")

    @abc.abstractmethod
    def _select_positions(self, pool: PoolView, n: int, rng: np.random.Generator) -> np.ndarray:
        """Row positions (int64 (n,), distinct, unlabelled) of the chosen samples.

        Called by :meth:`select` after validation: ``1 <= n <= pool.n_unlabeled``.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ScoreStrategy(Strategy):
    """A strategy that ranks unlabelled samples by a per-sample informativeness score.

    Subclasses supply only :meth:`score`. Selection keeps a running top-n over the pool's
    chunks, so memory stays bounded by ``chunk_size + n`` rows of scores.
    """

    @abc.abstractmethod
    def score(self, probs: np.ndarray) -> np.ndarray:
        """Informativeness of each row; HIGHER means more informative.

        Args:
            probs: float (m, C) class probabilities.

        Returns:
            float (m,) scores.
        """

    def _select_positions(self, pool: PoolView, n: int, rng: np.random.Generator) -> np.ndarray:
        if pool.features is None and pool.shards is not None and pool.probs is None:
            # the pool's rows live in shard actors: score there, merge the per-shard top-n
            return top_n_over_shards(pool.shards.group, pool, self, n)
        best_pos, best_score, best_ids = running_top_n(pool, self, n)
        # Most informative first; only n items are sorted.
        order = np.lexsort((best_ids, -best_score))
        return best_pos[order]
