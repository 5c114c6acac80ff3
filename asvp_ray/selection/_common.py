"""Helpers shared by the feature-based strategies (coreset, BADGE, TypiClust, ProbCover)."""
from __future__ import annotations

import numpy as np

from asvp_ray.core.errors import BadInputError
from asvp_ray.pool.view import PoolView

# Rows per distance pass chunk: (16384 x 512) float32 = 32 MiB, float64 scratch 128 KiB.
DISTANCE_CHUNK = 16384


def have_faiss() -> bool:
    """True when faiss is importable."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def chunk_rows(pool: PoolView) -> int:
    return int(min(pool.chunk_size, DISTANCE_CHUNK))


def need_features(where: str, pool: PoolView, sharded_ok: bool = False) -> np.ndarray:
    """The pool's feature matrix. With ``sharded_ok``, None for a pool held by shard actors."""
    if pool.features is None:
        if pool.shards is not None:
            if sharded_ok:
                return None
            raise BadInputError(f"{where} needs the pool's features in one process, but this run keeps the pool in "
                                "shard actors (pool_shards); use margin, entropy, least_confidence, coreset, badge or "
                                "cluster_margin, which run on the shards, or set pool_shards.mode: driver")
        raise BadInputError(f"{where} needs PoolView.features; pass the pool's feature matrix")
    if not np.issubdtype(pool.features.dtype, np.floating):
        raise BadInputError(f"{where}: PoolView.features must be floating point, got {pool.features.dtype}")
    return pool.features


def row_sqnorms(x: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Squared row norms in float64 (one definition for rows and centres, so d(x, x) = 0),
    computed in row chunks (no float64 copy of a large input)."""
    out = np.empty(len(x), dtype=np.float64)
    for s in range(0, len(x), chunk):
        xb = np.asarray(x[s : s + chunk]).astype(np.float64)
        out[s : s + chunk] = np.einsum("ij,ij->i", xb, xb)
    return out


def first_bad_row(values: np.ndarray) -> int:
    return int(np.flatnonzero(~np.isfinite(values))[0])

