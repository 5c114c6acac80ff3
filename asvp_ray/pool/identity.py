"""Identity of a feature matrix, for caches that live as long as one feature version (shard
actors, strategies' per-version state)."""
from __future__ import annotations

import hashlib
import os
import weakref
from typing import Optional

import numpy as np


class FeatureKey:
    """Identity of a feature matrix, for caches that live as long as one feature version.

    Memory maps match by file (path, offset, shape, dtype, size and mtime); in-memory arrays
    match only the very same array object (held by a weak reference). Both also compare a
    fingerprint of 64 sampled rows, so a buffer rewritten in place (a refresh written into
    the same array) is noticed too.
    """

    def __init__(self, features: np.ndarray):
        self._file = _memmap_identity(features)
        self._ref = None if self._file is not None else _weak(features)
        self._shape = tuple(features.shape)
        self._dtype = features.dtype.str
        self._fingerprint = row_fingerprint(features)

    def matches(self, features: Optional[np.ndarray]) -> bool:
        """True when ``features`` is the feature version this key was made from."""
        if features is None or tuple(features.shape) != self._shape or features.dtype.str != self._dtype:
            return False
        if self._file is not None:
            if _memmap_identity(features) != self._file:
                return False
        elif self._ref is None or self._ref() is not features:
            return False
        return row_fingerprint(features) == self._fingerprint


def _weak(obj):
    try:
        return weakref.ref(obj)
    except TypeError:  # pragma: no cover - numpy arrays support weak references
        return None


def _memmap_identity(features: np.ndarray):
    if isinstance(features, np.memmap) and getattr(features, "filename", None):
        try:
            st = os.stat(features.filename)
        except OSError:
            return None
        return (str(features.filename), int(features.offset), st.st_size, st.st_mtime_ns)
    return None


def row_fingerprint(features: np.ndarray) -> str:
    """A digest of 64 rows sampled evenly over ``features`` (a cheap identity of a feature matrix)."""
    n = len(features)
    h = hashlib.blake2b(digest_size=16)
    if n:
        rows = np.unique(np.linspace(0, n - 1, num=min(n, 64)).astype(np.int64))
        h.update(np.ascontiguousarray(features[rows]).tobytes())
    return h.hexdigest()
