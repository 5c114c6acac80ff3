"""Clustering- and coverage-based strategies on features: TypiClust and ProbCover.

**typiclust** (Hacohen et al., ICML 2022): k-means the pool into ``|L| + n`` clusters
(capped at ``max_clusters``), visit clusters with the fewest labelled points first (then the
largest), and pick from each the unlabelled point of highest typicality, the inverse mean
squared distance to its k nearest unlabelled cluster-mates (``k = min(k_neighbors, m // 2)``
for m candidates, as the authors' code does). Clusters of at most ``min_cluster_size`` points
are visited only once every other cluster is exhausted.

**probcover** (Yehuda et al., NeurIPS 2022): the delta-ball graph (``x -> y`` when
``||x - y|| < delta``, self-loops included) is covered greedily: each pick is the point that
covers the most not-yet-covered points (ties: the lower row); the labelled set's balls are
covered from the start. When everything is covered, the remaining picks are uniform among the
unlabelled points. The graph is exact (blocked brute force) for small pools and built with an
IVF index (k-means cells, each point searched in its ``nprobe`` nearest cells, BLAS-blocked
scans, made symmetric) for large ones; it is stored sparse and cached on the strategy object
for the feature version.

k-means runs on faiss (``use_gpu=True`` needs a GPU build of faiss that sees a GPU, else ConfigError) or on
scikit-learn.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np

from asvp_ray.errors import BadInputError, ConfigError
from asvp_ray.device import require_faiss_gpu
from asvp_ray.selection.base import STRATEGIES, PoolView, Strategy
from asvp_ray.selection.diversity import _need_features, _row_sqnorms
from asvp_ray.selection.sharded import FeatureKey

KMEANS_BACKENDS = ("auto", "faiss", "sklearn")
GRAPH_METHODS = ("auto", "exact", "ivf")
# Elements of one (queries x points) distance block: 16 Mi float32 = 64 MiB.
BLOCK_ELEMENTS = 1 << 24
ROW_CHUNK = 16384


def _have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _pos_int(where: str, name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{where}: {name}={value!r} must be a positive integer")


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


# ============================================================================ k-means
def kmeans_labels(
    X: np.ndarray,
    k: int,
    seed: int,
    backend: str = "auto",
    iters: int = 20,
    use_gpu: bool = False,
    max_points_per_centroid: int = 256,
    chunk_rows: int = 65536,
) -> np.ndarray:
    """Cluster rows of X into k clusters; returns int64 (N,) labels in [0, k).

    Args:
        X: float (N, D) features (a memory map is read in chunks).
        k: number of clusters, 1 <= k <= N.
        seed: random seed of the initialisation (and of faiss's training subsample).
        backend: "faiss", "sklearn" (``KMeans(n_init=1)``) or "auto" (faiss when installed).
        iters: k-means iterations (sklearn: ``max_iter``).
        use_gpu: train with faiss on the GPU(s).
        max_points_per_centroid: faiss trains on at most ``k *`` this many sampled rows.
        chunk_rows: rows assigned at once after training.

    Raises:
        ConfigError: ``use_gpu`` without a GPU build of faiss that sees a GPU.
    """
    N = len(X)
    if use_gpu:
        require_faiss_gpu("k-means")
    if backend == "auto":
        backend = "faiss" if _have_faiss() else "sklearn"
    if backend == "sklearn":
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, n_init=1, max_iter=iters, random_state=seed)
        return km.fit_predict(np.asarray(X, dtype=np.float32)).astype(np.int64)
    import faiss

    D = X.shape[1]
    n_train = min(N, k * max_points_per_centroid)
    if n_train < N:
        rows = np.sort(np.random.default_rng(seed).choice(N, size=n_train, replace=False))
        train = _as_f32(X[rows])
    else:
        train = _as_f32(X)
    km = faiss.Kmeans(D, k, niter=iters, seed=int(seed) % (2**31), verbose=False, gpu=bool(use_gpu),
                      max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1)
    km.train(train)
    del train
    labels = np.empty(N, dtype=np.int64)
    for s in range(0, N, chunk_rows):
        _, I = km.index.search(_as_f32(X[s : s + chunk_rows]), 1)
        labels[s : s + chunk_rows] = I[:, 0]
    return labels


# ============================================================================ TypiClust
def _knn_rows(Xq: np.ndarray, sq_q: np.ndarray, X: np.ndarray, sq: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices and squared distances of the k + 1 nearest rows of X (self included) for Xq.

    Exact: blocked BLAS products and a partial sort per row (faster here than faiss's flat
    search for the cluster sizes TypiClust sees).
    """
    m = len(X)
    idx = np.empty((len(Xq), k + 1), dtype=np.int64)
    dist = np.empty((len(Xq), k + 1), dtype=np.float32)
    step = max(1, BLOCK_ELEMENTS // max(m, 1))
    for s in range(0, len(Xq), step):
        # ||x||^2 - 2 q.x orders a query's row like its distance; ||q||^2 is added to the k + 1.
        d = Xq[s : s + step] @ X.T
        d *= -2.0
        d += sq[None, :]
        part = np.argpartition(d, k, axis=1)[:, : k + 1] if k + 1 < m else np.broadcast_to(np.arange(m), d.shape)
        idx[s : s + step] = part
        dist[s : s + step] = np.maximum(np.take_along_axis(d, part, axis=1) + sq_q[s : s + step, None], 0.0)
    return idx, dist


def _mean_without_self(dist: np.ndarray, k: int) -> np.ndarray:
    # The smallest of the k + 1 is the row itself (distance 0, or a duplicate's 0).
    return (dist.sum(axis=1, dtype=np.float64) - dist.min(axis=1)) / k


def knn_mean_sqdist(X: np.ndarray, k: int) -> np.ndarray:
    """Mean squared Euclidean distance of every row to its k nearest other rows (exact).

    Args:
        X: float (m, D), m >= k + 1.
        k: neighbours.

    Returns:
        float64 (m,).
    """
    X = _as_f32(X)
    sq = _row_sqnorms(X).astype(np.float32)
    return _mean_without_self(_knn_rows(X, sq, X, sq, k)[1], k)


class _ClusterTypicality:
    """Typicality of one cluster's remaining candidates, updated exactly when one is taken.

    Removing a row changes only the neighbour lists that contained it; those rows are
    searched again, all others keep theirs (unless k = min(k_neighbors, m // 2) changes).
    """

    def __init__(self, X: np.ndarray, rows: np.ndarray, k_neighbors: int):
        self.X = X
        self.rows = rows
        self.k_neighbors = k_neighbors
        self._knn = None

    def _features(self):
        F = _as_f32(self.X[self.rows])
        return F, _row_sqnorms(F).astype(np.float32)

    def _full(self) -> None:
        F, sq = self._features()
        self._k = min(self.k_neighbors, len(self.rows) // 2)
        # Only the neighbour lists are kept between visits (the features are gathered again).
        knn, self._dist = _knn_rows(F, sq, F, sq, self._k)
        self._knn = knn.astype(np.int32)

    def take_most_typical(self) -> int:
        """Pool position of the most typical remaining row (ties: the lower row); removes it."""
        m = len(self.rows)
        if m == 1:
            best = 0
        else:
            if self._knn is None:
                self._full()
            best = int(np.argmin(_mean_without_self(self._dist, self._k)))
        pos = int(self.rows[best])
        self._remove(best)
        return pos

    def _remove(self, j: int) -> None:
        self.rows = np.delete(self.rows, j)
        m = len(self.rows)
        if self._knn is None or m < 2 or min(self.k_neighbors, m // 2) != self._k:
            self._knn = self._dist = None
            return
        hit = (self._knn == j).any(axis=1)
        keep = np.ones(m + 1, dtype=bool)
        keep[j] = False
        knn, dist = self._knn[keep], self._dist[keep]
        hit = hit[keep]
        knn[knn > j] -= 1
        if hit.any():
            q = np.flatnonzero(hit)
            F, sq = self._features()
            idx, knn_d = _knn_rows(F[q], sq[q], F, sq, self._k)
            knn[q], dist[q] = idx, knn_d
        self._knn, self._dist = knn, dist


def typiclust_order(labels: np.ndarray, mask: np.ndarray, n_clusters: int, min_cluster_size: int) -> Tuple[List[int], List[int]]:
    """Visiting order of clusters: (eligible, small), each sorted by (labelled count asc,
    size desc, cluster id asc)."""
    sizes = np.bincount(labels, minlength=n_clusters)
    labelled = np.bincount(labels[mask], minlength=n_clusters)
    ids = np.arange(n_clusters)
    order = np.lexsort((ids, -sizes, labelled))
    order = order[sizes[order] > 0]
    big = sizes[order] > min_cluster_size
    return order[big].tolist(), order[~big].tolist()


@STRATEGIES.register("typiclust")
class TypiClustSampling(Strategy):
    """TypiClust: the most typical unlabelled point of each uncovered k-means cluster.

    Args:
        k_neighbors: neighbours of the typicality (20 in the paper).
        max_clusters: cap on the number of clusters (500 in the authors' code); None: no cap.
        min_cluster_size: clusters of at most this many points are visited last.
        backend: k-means backend: "auto" (faiss when installed), "faiss" or "sklearn".
        kmeans_iters: k-means iterations.
        use_gpu: run faiss k-means on the GPU (needs a faiss GPU build).
    """

    name = "typiclust"

    def __init__(
        self,
        k_neighbors: int = 20,
        max_clusters: Optional[int] = 500,
        min_cluster_size: int = 5,
        backend: str = "auto",
        kmeans_iters: int = 20,
        use_gpu: bool = False,
    ):
        self.k_neighbors = k_neighbors
        self.max_clusters = max_clusters
        self.min_cluster_size = min_cluster_size
        self.backend = backend
        self.kmeans_iters = kmeans_iters
        self.use_gpu = use_gpu

    def _check_params(self) -> None:
        _pos_int("typiclust", "k_neighbors", self.k_neighbors)
        _pos_int("typiclust", "max_clusters", self.max_clusters, allow_none=True)
        _pos_int("typiclust", "kmeans_iters", self.kmeans_iters)
        if isinstance(self.min_cluster_size, bool) or not isinstance(self.min_cluster_size, (int, np.integer)) or self.min_cluster_size < 0:
            raise ConfigError(f"typiclust: min_cluster_size={self.min_cluster_size!r} must be an integer >= 0")
        if self.backend not in KMEANS_BACKENDS:
            raise ConfigError(f"typiclust: backend={self.backend!r} is not one of {', '.join(KMEANS_BACKENDS)}")
        if self.backend == "faiss" and not _have_faiss():
            raise ConfigError("typiclust: backend='faiss' but faiss is not installed; pip install faiss-cpu or use backend='sklearn'")
        if self.use_gpu:
            require_faiss_gpu("typiclust")

    def _select_positions(self, pool: PoolView, n: int, rng: np.random.Generator) -> np.ndarray:
        self._check_params()
        X = _need_features("typiclust", pool)
        N = len(pool)
        mask = pool.labeled_mask
        k = int(np.count_nonzero(mask)) + n
        if self.max_clusters is not None:
            k = min(k, int(self.max_clusters))
        k = max(1, min(k, N))
        seed = int(rng.integers(2**31 - 1))
        labels = kmeans_labels(X, k, seed, self.backend, int(self.kmeans_iters), bool(self.use_gpu))
        self.labels_ = labels
        big, small = typiclust_order(labels, mask, k, int(self.min_cluster_size))
        # Unlabelled rows grouped by cluster, ascending row order within a cluster.
        cand = pool.unlabeled_positions()
        cand = cand[np.argsort(labels[cand], kind="stable")]
        bounds = np.searchsorted(labels[cand], np.arange(k + 1))
        remaining = {
            c: _ClusterTypicality(X, cand[bounds[c] : bounds[c + 1]], int(self.k_neighbors))
            for c in range(k)
            if bounds[c + 1] > bounds[c]
        }
        picks: List[int] = []
        for group in (big, small):
            group = [c for c in group if c in remaining]
            while len(picks) < n and group:
                for c in group:
                    picks.append(remaining[c].take_most_typical())
                    if len(picks) == n:
                        break
                group = [c for c in group if len(remaining[c].rows)]
        return np.asarray(picks, dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"TypiClustSampling(k_neighbors={self.k_neighbors!r}, max_clusters={self.max_clusters!r}, "
            f"backend={self.backend!r})"
        )


# ============================================================================ ProbCover graph
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
    if _have_faiss():
        import faiss

        km = faiss.Kmeans(train.shape[1], k, niter=10, seed=int(seed) % (2**31), verbose=False, gpu=bool(use_gpu),
                          max_points_per_centroid=64, min_points_per_centroid=1)
        km.train(_as_f32(train))
        return km.centroids
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=1, max_iter=10, random_state=seed).fit(train).cluster_centers_


def _row_norm_stats(X: np.ndarray, normalize: bool, chunk: int = ROW_CHUNK) -> np.ndarray:
    """Squared norms (raw) or inverse norms (normalised rows), float32 (N,)."""
    N = len(X)
    out = np.empty(N, dtype=np.float32)
    for s in range(0, N, chunk):
        sq = _row_sqnorms(X[s : s + chunk])
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
        train = _as_f32(X[pick])
        if normalize:
            train *= xs[pick][:, None]
        cent = _as_f32(_train_cells(train, nlist, seed, use_gpu))
        # k-means in high dimension leaves a few giant cells (and hubs that many rows probe):
        # split the cells holding more than twice the mean share of the sample, twice over.
        for _ in range(2):
            d = train @ cent.T
            d *= -2.0
            d += _row_sqnorms(cent).astype(np.float32)[None, :]
            own_t = np.argmin(d, axis=1)
            sizes = np.bincount(own_t, minlength=len(cent))
            mean = len(train) / len(cent)
            big = np.flatnonzero(sizes > 2.0 * mean)
            if not len(big):
                break
            parts = [cent[sizes <= 2.0 * mean]]
            for c in big:
                parts.append(_as_f32(_train_cells(train[own_t == c], int(np.ceil(sizes[c] / mean)), seed, use_gpu)))
            cent = np.concatenate(parts)
        nlist = len(cent)
        nprobe = max(1, min(int(nprobe), nlist))
        del train
        cs = _row_sqnorms(cent).astype(np.float32)
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


def probcover_select(graph: DeltaGraph, mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy max coverage on ``graph`` (exact, incremental degrees).

    Returns:
        int64 (n,) row positions in pick order.
    """
    N = graph.n_rows
    covered = np.zeros(N, dtype=bool)
    covered[graph.neighbours(np.flatnonzero(mask))] = True
    # Self-loops make every row non-empty, so reduceat sees no empty segment.
    deg = np.add.reduceat((~covered[graph.indices]).astype(np.int64), graph.indptr[:-1])
    picks: List[int] = []
    while len(picks) < n:
        c = int(np.argmax(deg))
        if deg[c] <= 0:
            break
        picks.append(c)
        nb = graph.indices[graph.indptr[c] : graph.indptr[c + 1]]
        new = nb[~covered[nb]]
        covered[new] = True
        # The graph is symmetric: the rows pointing at a newly covered y are y's neighbours.
        np.subtract.at(deg, graph.neighbours(new), 1)
    if len(picks) < n:
        taken = mask.copy()
        taken[picks] = True
        rest = np.flatnonzero(~taken)
        picks.extend(rest[rng.choice(len(rest), size=n - len(picks), replace=False)].tolist())
    return np.asarray(picks, dtype=np.int64)


@STRATEGIES.register("probcover")
class ProbCoverSampling(Strategy):
    """ProbCover: greedy coverage of the delta-ball graph of the features.

    Args:
        delta: ball radius (0.75 is the paper's CIFAR-10 value on unit-length embeddings).
        normalize: L2-normalise features first.
        graph: "exact", "ivf" or "auto" (exact up to ``exact_max_rows`` rows).
        exact_max_rows: pool size up to which "auto" builds the exact graph.
        nlist: IVF cells (None: ``clip(sqrt(N), 16, 4096)``).
        nprobe: IVF cells searched per row.
        graph_seed: seed of the IVF k-means (the graph is a function of the features).
        use_gpu: IVF k-means on the GPU (faiss GPU build).
    """

    name = "probcover"

    def __init__(
        self,
        delta: float = 0.75,
        normalize: bool = True,
        graph: str = "auto",
        exact_max_rows: int = 50_000,
        nlist: Optional[int] = None,
        nprobe: int = 8,
        graph_seed: int = 0,
        use_gpu: bool = False,
    ):
        self.delta = delta
        self.normalize = normalize
        self.graph = graph
        self.exact_max_rows = exact_max_rows
        self.nlist = nlist
        self.nprobe = nprobe
        self.graph_seed = graph_seed
        self.use_gpu = use_gpu
        self._cache = None

    def _check_params(self) -> None:
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float, np.integer, np.floating)) or not (
            np.isfinite(self.delta) and self.delta > 0
        ):
            raise ConfigError(f"probcover: delta={self.delta!r} must be a positive number")
        if self.graph not in GRAPH_METHODS:
            raise ConfigError(f"probcover: graph={self.graph!r} is not one of {', '.join(GRAPH_METHODS)}")
        _pos_int("probcover", "exact_max_rows", self.exact_max_rows)
        _pos_int("probcover", "nlist", self.nlist, allow_none=True)
        _pos_int("probcover", "nprobe", self.nprobe)
        if self.use_gpu:
            require_faiss_gpu("probcover")

    def build_graph(self, features: np.ndarray) -> DeltaGraph:
        """The delta-ball graph of ``features`` with this strategy's settings (cached)."""
        self._check_params()
        method = self.graph
        if method == "auto":
            method = "exact" if len(features) <= self.exact_max_rows else "ivf"
        params = (float(self.delta), bool(self.normalize), method, self.nlist, int(self.nprobe), int(self.graph_seed))
        cache = self._cache
        if cache is not None and cache["params"] == params and cache["features"].matches(features):
            return cache["graph"]
        self._cache = None
        g = delta_graph(features, self.delta, method, bool(self.normalize), self.nlist, int(self.nprobe),
                        int(self.graph_seed), bool(self.use_gpu))
        self._cache = {"params": params, "features": FeatureKey(features), "graph": g}
        return g

    def _select_positions(self, pool: PoolView, n: int, rng: np.random.Generator) -> np.ndarray:
        graph = self.build_graph(_need_features("probcover", pool))
        return probcover_select(graph, pool.labeled_mask, n, rng)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def __repr__(self) -> str:
        return f"ProbCoverSampling(delta={self.delta!r}, normalize={self.normalize!r}, graph={self.graph!r})"
