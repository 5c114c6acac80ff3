"""The delta-ball graph of ProbCover: exact (blocked brute force) or IVF (k-means cells, each
point searched in its ``nprobe`` nearest cells, BLAS-blocked scans, made symmetric); stored sparse."""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from asvp_ray.runtime.device import require_faiss_gpu
from asvp_ray.core.errors import BadInputError, ConfigError
from asvp_ray.selection._common import as_f32, have_faiss, row_sqnorms

GRAPH_METHODS = ("auto", "exact", "ivf")
# Elements of one (queries x points) distance block: 16 Mi float32 = 64 MiB.
BLOCK_ELEMENTS = 1 << 24
ROW_CHUNK = 16384


class DeltaGraph:
    """A sparse, symmetric delta-ball graph with self-loops (CSR).

    Attributes:
        indptr: int64 (N + 1,).
        indices: int32 (E,) neighbours of row i in ``indices[indptr[i]:indptr[i + 1]]``, sorted.
        stats: how it was built (method, seconds, edges, ...).
    """

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, stats: dict):
        self.indptr = indptr
        self.indices = indices
        self.stats = stats

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def n_edges(self) -> int:
        return int(self.indptr[-1])

    def neighbours(self, rows: np.ndarray) -> np.ndarray:
        """Concatenated neighbour lists of ``rows`` (int32)."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = self.indptr[rows]
        lens = self.indptr[rows + 1] - starts
        total = int(lens.sum())
        if total == 0:
            return np.empty(0, dtype=self.indices.dtype)
        offs = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(total, dtype=np.int64)
        return self.indices[offs]

    def to_scipy(self):
        """The graph as a ``scipy.sparse.csr_matrix`` of ones."""
        from scipy import sparse

        n = self.n_rows
        # Copies: scipy may compact a matrix's index arrays in place.
        return sparse.csr_matrix(
            (np.ones(self.n_edges, dtype=np.int8), self.indices.copy(), self.indptr.copy()), shape=(n, n)
        )


def _train_cells(train: np.ndarray, k: int, seed: int, use_gpu: bool) -> np.ndarray:
    """k-means centroids of ``train`` (float32 (k, D)); faiss when installed."""
    if use_gpu:
        require_faiss_gpu("probcover IVF k-means")
    k = max(1, min(k, len(train)))
    if k == 1:
        return train.mean(axis=0, keepdims=True)
    if have_faiss():
        import faiss

        km = faiss.Kmeans(train.shape[1], k, niter=10, seed=int(seed) % (2**31), verbose=False, gpu=bool(use_gpu),
                          max_points_per_centroid=64, min_points_per_centroid=1)
        km.train(as_f32(train))
        return km.centroids
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=1, max_iter=10, random_state=seed).fit(train).cluster_centers_


def _row_norm_stats(X: np.ndarray, normalize: bool, chunk: int = ROW_CHUNK) -> np.ndarray:
    """Squared norms (raw) or inverse norms (normalised rows), float32 (N,)."""
    N = len(X)
    out = np.empty(N, dtype=np.float32)
    for s in range(0, N, chunk):
        sq = row_sqnorms(X[s : s + chunk])
        if not np.isfinite(sq).all():
            raise BadInputError(
                f"probcover: feature row {s + int(np.flatnonzero(~np.isfinite(sq))[0])} holds NaN/inf; "
                f"clean or re-extract the features"
            )
        if normalize:
            nrm = np.sqrt(sq)
            with np.errstate(divide="ignore"):
                out[s : s + chunk] = np.where(nrm > 0, 1.0 / nrm, 0.0)
        else:
            out[s : s + chunk] = sq
    return out


def _prep(x: np.ndarray, stats: np.ndarray, normalize: bool) -> np.ndarray:
    """float32 rows, scaled to unit length when normalising (stats = inverse norms)."""
    x = np.asarray(x, dtype=np.float32)
    return x * stats[:, None] if normalize else x


def _ball_hits(q: np.ndarray, qs: np.ndarray, x: np.ndarray, xs: np.ndarray, normalize: bool, r2: float):
    """(i, j) with ||q_i - x_j||^2 < r2, for rows prepared by :func:`_prep`."""
    d = q @ x.T
    if normalize:
        # Unit rows: ||q - x||^2 = 2 - 2 q.x, one comparison on the product.
        return np.nonzero(d > np.float32(1.0 - r2 / 2.0))
    d *= -2.0
    d += qs[:, None]
    d += xs[None, :]
    return np.nonzero(d < r2)


def _csr_from_pairs(rows: List[np.ndarray], cols: List[np.ndarray], N: int) -> Tuple[np.ndarray, np.ndarray]:
    """Symmetric CSR (self-loops added, duplicates removed) from directed pairs."""
    from scipy import sparse

    ar = np.arange(N, dtype=np.int32)
    r = np.concatenate(rows + cols + [ar])
    c = np.concatenate(cols + rows + [ar])
    rows.clear()
    cols.clear()
    m = sparse.coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(N, N)).tocsr()
    m.sum_duplicates()
    m.sort_indices()
    return m.indptr.astype(np.int64), m.indices.astype(np.int32)


def delta_graph(
    X: np.ndarray,
    delta: float,
    method: str = "exact",
    normalize: bool = True,
    nlist: Optional[int] = None,
    nprobe: int = 8,
    seed: int = 0,
    use_gpu: bool = False,
) -> DeltaGraph:
    """The delta-ball graph ``x -> y iff ||x - y|| < delta`` (made symmetric, with self-loops).

    Args:
        X: float (N, D) features.
        delta: ball radius.
        method: "exact" (blocked brute force, N^2 D work) or "ivf": k-means cells; a row is
            searched in every cell its delta-ball can reach (the cell's half-space beyond the
            bisector with the row's own centroid is nearer than delta), at most ``nprobe`` of
            them, nearest first. Exact when no row needs more than ``nprobe`` cells
            (``stats["truncated_rows"] == 0``); distances of found pairs are always exact,
            and a pair is found when either end searches the other's cell.
        normalize: L2-normalise rows first (ProbCover works on unit-length embeddings).
        nlist: IVF cells; None means ``clip(sqrt(N), 16, 4096)``.
        nprobe: cells searched per row.
        seed: seed of the IVF k-means.
        use_gpu: IVF k-means on the GPU (faiss GPU build).

    Returns:
        :class:`DeltaGraph`.
    """
    import time

    t0 = time.perf_counter()
    N = len(X)
    r2 = float(delta) ** 2
    xs = _row_norm_stats(X, normalize)
    rows: List[np.ndarray] = []
    cols: List[np.ndarray] = []
    stats = {"method": method, "delta": float(delta), "normalize": bool(normalize)}
    if method == "exact":
        step = max(1, min(N, BLOCK_ELEMENTS // max(N, 1)))
        for a in range(0, N, step):
            b = min(a + step, N)
            q = _prep(X[a:b], xs[a:b], normalize)
            # Upper triangle only; the pairs are mirrored below.
            for c0 in range(a, N, ROW_CHUNK):
                c1 = min(c0 + ROW_CHUNK, N)
                i, j = _ball_hits(q, xs[a:b], _prep(X[c0:c1], xs[c0:c1], normalize), xs[c0:c1], normalize, r2)
                keep = (j + c0) > (i + a)
                rows.append((i[keep] + a).astype(np.int32))
                cols.append((j[keep] + c0).astype(np.int32))
        stats["pairs_computed"] = N * (N + 1) // 2
    elif method == "ivf":
        nlist = int(nlist or int(np.clip(np.sqrt(N), 16, 4096)))
        nlist = max(1, min(nlist, N))
        # Cells: k-means on (normalised) rows.
        n_train = min(N, nlist * 64)
        pick = np.sort(np.random.default_rng(seed).choice(N, size=n_train, replace=False))
        train = as_f32(X[pick])
        if normalize:
            train *= xs[pick][:, None]
        cent = as_f32(_train_cells(train, nlist, seed, use_gpu))
        # k-means in high dimension leaves a few giant cells (and hubs that many rows probe):
        # split the cells holding more than twice the mean share of the sample, twice over.
        for _ in range(2):
            d = train @ cent.T
            d *= -2.0
            d += row_sqnorms(cent).astype(np.float32)[None, :]
            own_t = np.argmin(d, axis=1)
            sizes = np.bincount(own_t, minlength=len(cent))
            mean = len(train) / len(cent)
            big = np.flatnonzero(sizes > 2.0 * mean)
            if not len(big):
                break
            parts = [cent[sizes <= 2.0 * mean]]
            for c in big:
                parts.append(as_f32(_train_cells(train[own_t == c], int(np.ceil(sizes[c] / mean)), seed, use_gpu)))
            cent = np.concatenate(parts)
        nlist = len(cent)
        nprobe = max(1, min(int(nprobe), nlist))
        del train
        cs = row_sqnorms(cent).astype(np.float32)
        # Half the distance between two centroids: a row's delta-ball can reach cell c only if
        # the row lies within delta of the bisector between its own centroid and c's.
        cc = cs[:, None] + cs[None, :] - 2.0 * (cent @ cent.T)
        two_cdist = 2.0 * np.sqrt(np.maximum(cc, 0.0))
        reach = np.float32(delta) * np.float32(1.0 + 1e-4) + np.float32(1e-6)
        probe = np.full((N, nprobe), -1, dtype=np.int32)
        truncated = 0
        probes = 0
        for s in range(0, N, ROW_CHUNK):
            xb = _prep(X[s : s + ROW_CHUNK], xs[s : s + ROW_CHUNK], normalize)
            m = len(xb)
            d = xb @ cent.T
            d *= -2.0
            d += cs[None, :]  # ||x - mu||^2 - ||x||^2
            own = np.argmin(d, axis=1)
            r = np.arange(m)
            with np.errstate(divide="ignore", invalid="ignore"):
                gap = (d - d[r, own][:, None]) / two_cdist[own]
            ok = gap < reach
            ok[r, own] = True
            n_ok = ok.sum(axis=1)
            truncated += int((n_ok > nprobe).sum())
            probes += int(np.minimum(n_ok, nprobe).sum())
            d[~ok] = np.inf
            d[r, own] = -np.inf  # the own cell first
            if nprobe < nlist:
                part = np.argpartition(d, nprobe - 1, axis=1)[:, :nprobe]
            else:
                part = np.broadcast_to(np.arange(nlist), d.shape).copy()
            dd = np.take_along_axis(d, part, axis=1)
            order = np.argsort(dd, axis=1, kind="stable")
            part = np.take_along_axis(part, order, axis=1)
            part[np.take_along_axis(dd, order, axis=1) == np.inf] = -1
            probe[s : s + m] = part
        own = probe[:, 0].astype(np.int64)
        m_order = np.argsort(own, kind="stable")
        m_bounds = np.searchsorted(own[m_order], np.arange(nlist + 1))
        flat = probe.reshape(-1).astype(np.int64)
        q_order = np.argsort(flat, kind="stable")
        q_order = q_order[flat[q_order] >= 0]
        q_rows = q_order // nprobe
        q_bounds = np.searchsorted(flat[q_order], np.arange(nlist + 1))
        del probe, flat, q_order
        pairs = 0
        for c in range(nlist):
            mem = m_order[m_bounds[c] : m_bounds[c + 1]]
            qry = q_rows[q_bounds[c] : q_bounds[c + 1]]
            if not len(mem) or not len(qry):
                continue
            xm = _prep(X[mem], xs[mem], normalize)
            step = max(1, BLOCK_ELEMENTS // len(mem))
            for a in range(0, len(qry), step):
                qa = qry[a : a + step]
                i, j = _ball_hits(_prep(X[qa], xs[qa], normalize), xs[qa], xm, xs[mem], normalize, r2)
                src, dst = qa[i], mem[j]
                keep = src != dst
                rows.append(src[keep].astype(np.int32))
                cols.append(dst[keep].astype(np.int32))
            pairs += len(qry) * len(mem)
        # Rows whose ball may reach more than nprobe cells lose the farthest ones: the graph
        # is exact when none is truncated.
        stats.update(nlist=nlist, nprobe=nprobe, pairs_computed=int(pairs), truncated_rows=truncated,
                     mean_probes=probes / max(N, 1))
    else:
        raise ConfigError(f"probcover: graph method {method!r} is not one of exact, ivf")
    indptr, indices = _csr_from_pairs(rows, cols, N)
    stats.update(edges=int(indptr[-1]), seconds=time.perf_counter() - t0, mean_degree=float(indptr[-1]) / max(N, 1))
    return DeltaGraph(indptr, indices, stats)


def graph_recall(approx: DeltaGraph, exact: DeltaGraph) -> float:
    """Fraction of the exact graph's edges (self-loops excluded) present in ``approx``."""
    a = approx.to_scipy()
    e = exact.to_scipy()
    e.setdiag(0)
    e.eliminate_zeros()
    total = e.nnz
    if total == 0:
        return 1.0
    hit = e.multiply(a).nnz
    return hit / total

