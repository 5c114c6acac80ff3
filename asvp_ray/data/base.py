"""What every pool source is: :class:`PoolSource` (stable int64 ids, optional labels, a Ray
Dataset of decoded images), and the id and label helpers the source kinds share.

Every sample carries a stable int64 id that never changes for the life of a run:
- Fashion-MNIST: the row index in the IDX file;
- image folder: a 63-bit hash of the path relative to the folder (so adding files later does not
  renumber the others);
- manifest: the ``id`` column, as written by the user.

Images are decoded inside Ray tasks, block by block, so a pool of millions of files streams.
The kinds are registered in :data:`asvp_ray.data.sources.SOURCES`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa

from asvp_ray.core.errors import BadInputError

ROWS_PER_BLOCK = 1024


class PoolSource(ABC):
    """A set of images with stable ids and, when known, ground-truth labels.

    Subclasses build their index (ids, labels, paths) on construction, which is cheap: no
    image is decoded until ``to_dataset`` runs in Ray.
    """

    kind: str = ""

    @property
    @abstractmethod
    def ids(self) -> np.ndarray:
        """int64 ids, shape (N,), sorted ascending."""

    @property
    def labels(self) -> Optional[np.ndarray]:
        """int64 ground-truth labels aligned to ``ids`` (class indices), or None when unknown."""
        return None

    @property
    def classes(self) -> Optional[List[str]]:
        """Class names, index = label; None when the source carries no labels."""
        return None

    def __len__(self) -> int:
        return len(self.ids)

    def paths(self, ids: Sequence[int]) -> List[str]:
        """A path or URI a person can open for each id (for labelling tools)."""
        return [f"{self.kind}:{int(i)}" for i in ids]

    @abstractmethod
    def to_dataset(self, ids: Optional[np.ndarray] = None, skip_unreadable: bool = False):
        """A Ray Dataset with columns ``id`` (int64), ``image`` (uint8, HxW or HxWxC) and ``error``
        (empty string when the image was read; the reason when ``skip_unreadable`` dropped it).

        Args:
            ids: only these ids (default: all).
            skip_unreadable: mark unreadable images instead of failing the job.
        """

    @abstractmethod
    def describe(self) -> Dict[str, Any]:
        """A JSON-able description for the feature store's metadata."""

    def label_of(self, ids: np.ndarray) -> np.ndarray:
        """Ground-truth labels of ``ids`` (the simulated oracle's source of truth)."""
        if self.labels is None:
            raise BadInputError(f"{self.kind} source {self.describe()} has no labels; use a labelled source "
                                "or the human oracle")
        pos = np.searchsorted(self.ids, ids)
        bad = (pos >= len(self.ids)) | (self.ids[np.minimum(pos, len(self.ids) - 1)] != ids)
        if bad.any():
            raise BadInputError(f"ids not in the pool: {ids[bad][:10].tolist()}")
        return self.labels[pos]


def is_sorted(ids: np.ndarray) -> bool:
    return bool(len(ids) < 2 or (ids[1:] >= ids[:-1]).all())


def duplicate_ids(ids: np.ndarray) -> np.ndarray:
    """The ids that occur more than once, sorted (no sorted copy when ``ids`` are sorted already)."""
    s = ids if is_sorted(ids) else np.sort(ids)
    return np.unique(s[1:][s[1:] == s[:-1]])


def id_positions(all_ids: np.ndarray, ids: Optional[np.ndarray]) -> np.ndarray:
    if ids is None:
        return np.arange(len(all_ids))
    ids = np.asarray(ids, dtype=np.int64)
    pos = np.searchsorted(all_ids, ids)
    ok = (pos < len(all_ids)) & (all_ids[np.minimum(pos, len(all_ids) - 1)] == ids)
    if not ok.all():
        raise BadInputError(f"ids not in the pool: {ids[~ok][:10].tolist()}")
    return pos


def is_integral(v) -> bool:
    """True for a value equal to an integer (3, 3.0, "3"): a manifest id column read from CSV."""
    try:
        return float(v) == int(v)
    except (TypeError, ValueError):
        return False


def labels_from_column(raw, classes: Optional[List[str]], origin: str, ids: np.ndarray):
    """Map a label column (names or indices; an Arrow array or a list) to class indices, or raise
    naming the bad rows. Each distinct value is looked up once (a million-row column holds a few)."""
    col = raw if isinstance(raw, (pa.Array, pa.ChunkedArray)) else pa.array(raw)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.null_count:
        bad = np.asarray(ids)[np.asarray(col.is_null())][:10].tolist()
        raise BadInputError(f"{origin}: ids {[int(i) for i in bad]} have no label; label every row or drop the "
                            "label column")
    enc = col.dictionary_encode()
    values = enc.dictionary.to_pylist()
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    if classes is None:
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            classes = [str(c) for c in range(max(values) + 1)] if values else []
        else:
            classes = sorted({str(v) for v in values})
    index = {c: k for k, c in enumerate(classes)}
    mapped = np.full(len(values), -1, dtype=np.int64)
    for k, v in enumerate(values):
        if str(v) in index:
            mapped[k] = index[str(v)]
        elif isinstance(v, (int, np.integer)) and 0 <= int(v) < len(classes):
            mapped[k] = int(v)
    out = mapped[codes]
    if (out < 0).any():
        rows = np.flatnonzero(out < 0)[:10]
        bad = [(int(ids[r]), values[codes[r]]) for r in rows]
        raise BadInputError(f"{origin}: label(s) not among the {len(classes)} classes ({', '.join(classes[:10])}"
                            f"{', ...' if len(classes) > 10 else ''}): " +
                            ", ".join(f"id {i}: {v!r}" for i, v in bad) +
                            ". Fix the labels or list the classes in data.classes")
    return out, list(classes)
