"""TypiClust (Hacohen et al., ICML 2022) on features.

K-means the pool into ``|L| + n`` clusters
(capped at ``max_clusters``), visit clusters with the fewest labelled points first (then the
largest), and pick from each the unlabelled point of highest typicality, the inverse mean
squared distance to its k nearest unlabelled cluster-mates (``k = min(k_neighbors, m // 2)``
for m candidates, as the authors' code does). Clusters of at most ``min_cluster_size`` points
are visited only once every other cluster is exhausted.

k-means runs on faiss (``use_gpu=True`` needs a GPU build of faiss that sees a GPU, else ConfigError) or on
scikit-learn.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import numpy as np

from asvp_ray.core.checks import check_int
from asvp_ray.runtime.device import require_faiss_gpu
from asvp_ray.core.errors import ConfigError
from asvp_ray.pool.view import PoolView
from asvp_ray.selection._common import as_f32, have_faiss, need_features, row_sqnorms
from asvp_ray.selection.base import STRATEGIES, Strategy

KMEANS_BACKENDS = ("auto", "faiss", "sklearn")
# Elements of one (queries x points) distance block: 16 Mi float32 = 64 MiB.
BLOCK_ELEMENTS = 1 << 24


# ============================================================================ k-means
class KMeansFit:
    """A trained k-means: ``centroids`` float32 (k, D), ``assign(rows)`` the nearest centroid of
    each row, and ``train_labels`` (sklearn only: the training rows' labels)."""

    def __init__(self, centroids: np.ndarray, assign: Callable[[np.ndarray], np.ndarray],
                 train_labels: Optional[np.ndarray] = None):
        self.centroids = np.asarray(centroids, dtype=np.float32)
        self.assign = assign
        self.train_labels = train_labels


def train_kmeans(S: np.ndarray, k: int, seed: int, iters: int, backend: str = "auto", *, use_gpu: bool = False,
                 max_points_per_centroid: int = 256) -> KMeansFit:
    """k-means on the rows ``S`` (float32 (n, D)): faiss (``use_gpu``: on the GPUs) or sklearn
    ``KMeans(n_init=1)``; ``backend="auto"`` takes faiss when it is installed."""
    if backend == "auto":
        backend = "faiss" if have_faiss() else "sklearn"
    if backend == "sklearn":
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, n_init=1, max_iter=iters, random_state=seed).fit(S)
        return KMeansFit(km.cluster_centers_, lambda A: km.predict(as_f32(A)).astype(np.int64),
                         km.labels_.astype(np.int64))
    import faiss

    fk = faiss.Kmeans(S.shape[1], k, niter=iters, seed=int(seed) % (2**31), verbose=False, gpu=bool(use_gpu),
                      max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1)
    fk.train(S)
    return KMeansFit(fk.centroids, lambda A: fk.index.search(as_f32(A), 1)[1][:, 0].astype(np.int64))


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
        backend = "faiss" if have_faiss() else "sklearn"
    if backend == "sklearn":
        return train_kmeans(np.asarray(X, dtype=np.float32), k, seed, iters, "sklearn").train_labels
    n_train = min(N, k * max_points_per_centroid)
    if n_train < N:
        rows = np.sort(np.random.default_rng(seed).choice(N, size=n_train, replace=False))
        train = as_f32(X[rows])
    else:
        train = as_f32(X)
    km = train_kmeans(train, k, seed, iters, "faiss", use_gpu=use_gpu, max_points_per_centroid=max_points_per_centroid)
    del train
    labels = np.empty(N, dtype=np.int64)
    for s in range(0, N, chunk_rows):
        labels[s : s + chunk_rows] = km.assign(X[s : s + chunk_rows])
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
    X = as_f32(X)
    sq = row_sqnorms(X).astype(np.float32)
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
        F = as_f32(self.X[self.rows])
        return F, row_sqnorms(F).astype(np.float32)

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
        check_int("typiclust", "k_neighbors", self.k_neighbors)
        check_int("typiclust", "max_clusters", self.max_clusters, allow_none=True)
        check_int("typiclust", "kmeans_iters", self.kmeans_iters)
        check_int("typiclust", "min_cluster_size", self.min_cluster_size, minimum=0)
        if self.backend not in KMEANS_BACKENDS:
            raise ConfigError(f"typiclust: backend={self.backend!r} is not one of {', '.join(KMEANS_BACKENDS)}")
        if self.backend == "faiss" and not have_faiss():
            raise ConfigError("typiclust: backend='faiss' but faiss is not installed; pip install faiss-cpu or use backend='sklearn'")
        if self.use_gpu:
            require_faiss_gpu("typiclust")

    def _select_positions(self, pool: PoolView, n: int, rng: np.random.Generator) -> np.ndarray:
        self._check_params()
        X = need_features("typiclust", pool)
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
