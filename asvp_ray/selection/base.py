"""What a query strategy sees of the pool, the strategy base classes, and their registry.

A strategy has one public method, ``select(pool, n, rng) -> ids``. The base class validates
the request and the answer; a subclass implements one hook. Score-based strategies supply
only ``score(probs)`` and inherit a chunked, memory-bounded running top-n.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Tuple

import numpy as np

from asvp_ray.core.checks import check_int, is_int
from asvp_ray.core.errors import AsvpError, BadInputError, EmptyPoolError, PoolExhaustedError
from asvp_ray.core.registry import Registry

STRATEGIES: Registry["Strategy"] = Registry("strategy")


@dataclass(kw_only=True)
class PoolView:
    """What a strategy may see of the pool: features, model outputs, which rows are labelled.

    Labels of unlabelled samples are never part of it.

    Args:
        ids: int64 (N,) stable pool ids, in feature-row order; unique.
        features: float32 (N, D) features, or None. May be a read-only memory map.
        labeled_mask: bool (N,), True where the sample is already labelled.
        model: a fitted model with ``predict_proba(X) -> (m, C)`` and optionally
            ``hidden_activations(X) -> (m, H)`` (e.g. :class:`asvp_ray.proxy.mlp.MLPProxy`),
            or None.
        probs: precomputed class probabilities, float (N, C), or None; used when scores
            come from a fine-tuned backbone rather than the proxy. It wins over ``model``.
        chunk_size: rows scored at once; bounds the memory of score-based selection.
        shards: the pool's rows held by shard actors that loaded them from the feature store
            (:class:`~asvp_ray.selection.sharded.StoreShards`), with ``features`` None: the
            strategies that shard run on them; the others need ``features``.

    Raises:
        BadInputError: shapes or dtypes disagree, or ids repeat.
    """

    ids: np.ndarray
    features: Optional[np.ndarray] = None
    labeled_mask: np.ndarray
    model: Any = None
    probs: Optional[np.ndarray] = None
    chunk_size: int = 65536
    shards: Any = None
    #: whether ``ids`` strictly ascend (a run's pool): derived at construction
    ids_ascending: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise BadInputError(f"PoolView.ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        self.ids = ids.astype(np.int64, copy=False)
        N = len(self.ids)
        # A run's pool ids ascend: checked without the sorted copies np.unique makes (56 MB at 1M ids)
        self.ids_ascending = strictly_ascending(self.ids)
        repeats = 0 if self.ids_ascending else N - len(np.unique(self.ids))
        if repeats:
            raise BadInputError(f"PoolView.ids holds duplicate ids ({repeats} repeats); pool ids must be unique")
        mask = np.asarray(self.labeled_mask)
        if mask.dtype != np.bool_ or mask.shape != (N,):
            raise BadInputError(
                f"PoolView.labeled_mask must be bool with shape ({N},) like ids, got {mask.dtype} {mask.shape}"
            )
        self.labeled_mask = mask
        if self.features is not None:
            if self.features.ndim != 2 or self.features.shape[0] != N:
                raise BadInputError(
                    f"PoolView.features must have shape ({N}, D) like ids, got {self.features.shape}"
                )
        if self.probs is not None:
            self.probs = np.asarray(self.probs)
            if self.probs.ndim != 2 or self.probs.shape[0] != N:
                raise BadInputError(f"PoolView.probs must have shape ({N}, C) like ids, got {self.probs.shape}")
        check_int("", "PoolView.chunk_size", self.chunk_size, error=BadInputError)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_unlabeled(self) -> int:
        """Number of unlabelled rows."""
        return int(len(self.ids) - np.count_nonzero(self.labeled_mask))

    def unlabeled_positions(self) -> np.ndarray:
        """Row positions (int64, ascending) of the unlabelled samples."""
        return np.flatnonzero(~self.labeled_mask).astype(np.int64, copy=False)

    def iter_unlabeled_blocks(self) -> Iterator[Tuple[np.ndarray, slice]]:
        """Walk the pool in row blocks of ``chunk_size``.

        Yields:
            ``(positions, block)``: int64 positions of the unlabelled rows in the block
            (possibly empty) and the ``slice`` of rows the block covers. When the block is
            fully unlabelled, ``features[block]`` is a view, no copy.
        """
        N = len(self.ids)
        cs = int(self.chunk_size)
        for s in range(0, N, cs):
            block = slice(s, min(s + cs, N))
            pos = np.flatnonzero(~self.labeled_mask[block]).astype(np.int64, copy=False)
            pos += s
            yield pos, block

    def _rows(self, array: np.ndarray, pos: np.ndarray, block: slice) -> np.ndarray:
        # A fully unlabelled block is a contiguous slice: no gather copy.
        if len(pos) == block.stop - block.start:
            return array[block]
        return array[pos]

    def iter_proba_chunks(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Class probabilities of the unlabelled rows, chunk by chunk.

        Yields:
            ``(positions, probs)``: int64 (m,) row positions and float (m, C)
            probabilities, m <= ``chunk_size``; every unlabelled row appears exactly once,
            in ascending position order.

        Raises:
            BadInputError: neither ``probs`` nor ``model`` with ``features`` is given, or the
                model returns the wrong shape.
        """
        if self.probs is None and (self.model is None or self.features is None):
            raise BadInputError(
                "this strategy needs class probabilities: give PoolView.probs, or a fitted "
                "PoolView.model together with PoolView.features"
            )
        for pos, block in self.iter_unlabeled_blocks():
            if len(pos) == 0:
                continue
            if self.probs is not None:
                probs = self._rows(self.probs, pos, block)
            else:
                probs = np.asarray(self.model.predict_proba(self._rows(self.features, pos, block)))
                if probs.ndim != 2 or probs.shape[0] != len(pos):
                    raise BadInputError(
                        f"PoolView.model.predict_proba returned shape {probs.shape} for "
                        f"{len(pos)} rows; expected ({len(pos)}, C)"
                    )
            yield pos, probs

    def iter_feature_chunks(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Features of the unlabelled rows, chunk by chunk.

        Yields:
            ``(positions, features)``: int64 (m,) row positions and (m, D) features.

        Raises:
            BadInputError: ``features`` is None.
        """
        if self.features is None:
            raise BadInputError("this strategy needs PoolView.features; pass the pool's feature matrix")
        for pos, block in self.iter_unlabeled_blocks():
            if len(pos):
                yield pos, self._rows(self.features, pos, block)


def strictly_ascending(ids: np.ndarray) -> bool:
    """Whether ``ids`` strictly ascend (so are unique), checked in 1,048,576-row chunks: no
    temporary of the array's length."""
    ids = np.asarray(ids)
    step, last = 1 << 20, len(ids) - 1
    return all(bool((ids[i + 1:min(i + step, last) + 1] > ids[i:min(i + step, last)]).all())
               for i in range(0, max(last, 0), step))


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


def top_n(scores: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` best entries: highest score first, ties by lower id.

    Linear time (``np.partition``/``argpartition``), no full sort of the input. The result is
    in no particular order.

    Args:
        scores: float (m,) scores; higher is better; finite.
        ids: int64 (m,) distinct tie-break keys.
        n: how many to keep.

    Returns:
        int64 (min(n, m),) indices into ``scores``.
    """
    m = len(scores)
    if n >= m:
        return np.arange(m, dtype=np.int64)
    threshold = np.partition(scores, m - n)[m - n]  # the n-th largest score
    above = np.flatnonzero(scores > threshold)
    tied = np.flatnonzero(scores == threshold)
    need = n - len(above)
    if len(tied) > need:
        tied = tied[np.argpartition(ids[tied], need - 1)[:need]]
    return np.concatenate([above, tied]).astype(np.int64, copy=False)


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
            from asvp_ray.selection.sharded import top_n_over_shards

            return top_n_over_shards(pool.shards.group, pool, self, n)
        best_pos, best_score, best_ids = running_top_n(pool, self, n)
        # Most informative first; only n items are sorted.
        order = np.lexsort((best_ids, -best_score))
        return best_pos[order]


def running_top_n(pool: PoolView, strategy: "ScoreStrategy", n: int, row_offset: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``n`` best unlabelled rows of ``pool`` by ``strategy.score``, kept chunk by chunk.

    Memory stays bounded by ``chunk_size + n`` rows of scores. Used by
    :class:`ScoreStrategy` on a whole pool and by each shard of
    :class:`asvp_ray.selection.sharded.ShardedStrategy` on its rows.

    Args:
        row_offset: pool position of ``pool``'s first row (a shard's start), for messages.

    Returns:
        ``(positions, scores, ids)``: row positions in ``pool`` (int64), float64 scores and
        ids of at most ``n`` rows, unordered.

    Raises:
        AsvpError: ``score`` returned the wrong shape (a bug in the strategy).
        BadInputError: a score is NaN/inf (the probabilities hold NaN/inf).
    """
    best_pos = np.empty(0, dtype=np.int64)
    best_score = np.empty(0, dtype=np.float64)
    for pos, probs in pool.iter_proba_chunks():
        s = np.asarray(strategy.score(probs), dtype=np.float64)
        if s.shape != (len(pos),):
            raise AsvpError(f"strategy {strategy.name!r}: score returned shape {s.shape}, expected ({len(pos)},)")
        if not np.isfinite(s).all():
            row = int(pos[np.flatnonzero(~np.isfinite(s))[0]])
            raise BadInputError(
                f"strategy {strategy.name!r}: non-finite score for pool id {int(pool.ids[row])} "
                f"(row {row + row_offset}); its class probabilities hold NaN/inf"
            )
        cand_pos = np.concatenate([best_pos, pos])
        cand_score = np.concatenate([best_score, s])
        keep = top_n(cand_score, pool.ids[cand_pos], n)
        best_pos, best_score = cand_pos[keep], cand_score[keep]
    return best_pos, best_score, pool.ids[best_pos]
