"""Top-n selection by score: a linear-time top-n, the running top-n over a pool's chunks, and the
same over the pool's shard actors (each shard keeps its own top-n, the caller merges them).

Shared by :class:`asvp_ray.selection.base.ScoreStrategy` (whole pools and pools held by shard
actors) and :class:`asvp_ray.selection.sharded.ShardedStrategy`; the answers are equal.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence, Tuple

import numpy as np

from asvp_ray.core.errors import AsvpError, BadInputError
from asvp_ray.pool.shards import ActorGroup
from asvp_ray.pool.view import PoolView


class Scorer(Protocol):
    """What the top-n needs of a score strategy (:class:`asvp_ray.selection.base.ScoreStrategy`)."""

    name: str

    def score(self, probs: np.ndarray) -> np.ndarray:
        """float (m,) informativeness of (m, C) class probabilities; higher is more informative."""


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


def running_top_n(pool: PoolView, strategy: Scorer, n: int, row_offset: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``n`` best unlabelled rows of ``pool`` by ``strategy.score``, kept chunk by chunk.

    Memory stays bounded by ``chunk_size + n`` rows of scores. Used by
    :class:`~asvp_ray.selection.base.ScoreStrategy` on a whole pool and by each shard of
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


def shard_score_top_n(
    features: np.ndarray,
    start: int,
    ids: np.ndarray,
    mask: np.ndarray,
    probs: Optional[np.ndarray],
    model: Any,
    strategy: Scorer,
    n: int,
    chunk_size: int,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A shard's top-n, exactly as :class:`~asvp_ray.selection.base.ScoreStrategy` keeps it.

    ``ids`` None: the pool's ids ascend with its positions, so the positions break ties in their
    place (the caller maps them back; the ids need not travel to the shard).

    Returns:
        ``(positions, scores, ids)``: pool positions (int64), float64 scores and ids (or positions,
        for ``ids`` None) of at most ``n`` rows of this shard, unordered.
    """
    if ids is None:
        ids = np.arange(start, start + len(mask), dtype=np.int64)
    feats = features if features.shape[1] else None
    view = PoolView(ids=ids, features=feats, labeled_mask=mask, model=model, probs=probs, chunk_size=chunk_size)
    pos, score, top_ids = running_top_n(view, strategy, n, row_offset=start)
    return pos + start, score, top_ids


def merge_top_n(parts: Sequence[Tuple[np.ndarray, np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """Global top-n positions from per-shard top-n's, most informative first (ties: lower id)."""
    pos = np.concatenate([p[0] for p in parts])
    score = np.concatenate([p[1] for p in parts])
    ids = np.concatenate([p[2] for p in parts])
    keep = top_n(score, ids, n)
    pos, score, ids = pos[keep], score[keep], ids[keep]
    return pos[np.lexsort((ids, -score))]


def top_n_over_shards(group: ActorGroup, pool: PoolView, strategy: Scorer, n: int) -> np.ndarray:
    """The global top-n positions of a score strategy over shards that hold the pool's rows (or
    none, when ``pool.probs`` is given): each shard scores its rows and keeps its top-n, the
    driver merges them (most informative first, ties by lower id).

    Raises:
        BadInputError: neither probabilities nor a model to compute them.
    """
    if pool.probs is None and (pool.model is None or (pool.features is None and pool.shards is None)):
        raise BadInputError(
            "this strategy needs class probabilities: give PoolView.probs, or a fitted "
            "PoolView.model together with PoolView.features"
        )
    # sorted ids (a run's pool): positions stand in for them on the shards (8 bytes a row less to
    # send each round, and no object-store pages of them left in this process)
    by_position = pool.ids_ascending
    args = []
    for s, e in group.bounds:
        probs = pool.probs[s:e] if pool.probs is not None else None
        model = pool.model if pool.probs is None else None
        args.append((None if by_position else pool.ids[s:e], pool.labeled_mask[s:e], probs, model, strategy, n,
                     int(pool.chunk_size)))
    parts = group.apply_all(shard_score_top_n, args)
    if by_position:
        parts = [(p, score, np.asarray(pool.ids)[p]) for p, score, _ in parts]
    return merge_top_n(parts, n)
