"""The pool as the rest of the package sees it: ids, features (or the shard actors holding them),
which rows are labelled, and the model outputs a strategy may read.

:class:`PoolView` is what a query strategy gets (``strategy.select(pool, n, rng)``); the driver
builds one each round. It validates itself at construction and walks its unlabelled rows in
memory-bounded chunks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Tuple

import numpy as np

from asvp_ray.core.checks import check_int
from asvp_ray.core.errors import BadInputError


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
            (:class:`~asvp_ray.pool.store_shards.StoreShards`), with ``features`` None: the
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
