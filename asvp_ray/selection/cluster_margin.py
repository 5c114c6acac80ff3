"""Cluster-Margin (Citovsky et al., "Batch Active Learning at Scale", NeurIPS 2021).

Large batches picked by margin alone crowd into one corner of the pool: many near-duplicates of
the same confusing images. Cluster-Margin keeps margin's informativeness and adds diversity at the
cost of one clustering per feature version:

1. **Once per feature version**, cluster the pool: k-means (faiss, else scikit-learn) on a seeded
   sample of at most ``sample_size`` rows gives ``coarse_clusters`` centroids, and
   hierarchical agglomerative clustering with average linkage (the paper's choice) merges the
   centroids into ``n_clusters`` clusters. A row belongs to the cluster of its nearest centroid.
   This is the scalable scheme the paper's HAC stands for at 10M images: memory is bounded by the
   sample, not by the pool, and assigning a row costs one nearest-centroid search.
2. **Every round**, shortlist the ``margin_factor x n`` unlabelled rows with the smallest margin
   (through :class:`~asvp_ray.selection.sharded.ShardedStrategy`, so the shortlist can be scored
   on shard actors like ``margin``), group them by cluster, sort the groups from the smallest up,
   and fill the batch round-robin: one random row from each group in turn, until ``n``.

Only the shortlisted rows' features are read each round (to find their clusters), so a round's
memory is ``margin_factor x n`` rows beyond the scoring itself.
"""
from __future__ import annotations

import hashlib
import logging
import math
from typing import Optional

import numpy as np

from asvp_ray.core.checks import check_int, is_int, is_number
from asvp_ray.core.errors import ConfigError
from asvp_ray.pool.identity import row_fingerprint
from asvp_ray.pool.view import PoolView
from asvp_ray.selection._common import as_f32, have_faiss, need_features
from asvp_ray.selection.base import STRATEGIES, Strategy
from asvp_ray.selection.sharded import DEFAULT_SHARD_MIN_ROWS, ShardedStrategy
from asvp_ray.selection.typiclust import train_kmeans
from asvp_ray.selection.uncertainty import MarginSampling

log = logging.getLogger(__name__)


class PoolClusters:
    """The clustering of one feature version: coarse centroids and the cluster of each.

    Args:
        centroids: float32 (K, D).
        centroid_cluster: int64 (K,) cluster of each centroid, in [0, n_clusters).
        key: fingerprint of the feature version it was fitted on.
    """

    def __init__(self, centroids: np.ndarray, centroid_cluster: np.ndarray, key: str):
        self.centroids = as_f32(centroids)
        self.centroid_cluster = np.asarray(centroid_cluster, dtype=np.int64)
        self.key = key
        self.n_clusters = int(self.centroid_cluster.max()) + 1 if len(self.centroid_cluster) else 0
        self._index = None

    def assign(self, X: np.ndarray, chunk: int = 16384) -> np.ndarray:
        """Cluster of each row of ``X`` (its nearest centroid's), int64 (m,)."""
        out = np.empty(len(X), dtype=np.int64)
        if have_faiss():
            import faiss

            if self._index is None:
                self._index = faiss.IndexFlatL2(self.centroids.shape[1])
                self._index.add(self.centroids)
            for s in range(0, len(X), chunk):
                _, idx = self._index.search(as_f32(X[s : s + chunk]), 1)
                out[s : s + chunk] = self.centroid_cluster[idx[:, 0]]
            return out
        c = self.centroids.astype(np.float64)
        csq = np.einsum("ij,ij->i", c, c)
        for s in range(0, len(X), chunk):
            xb = np.asarray(X[s : s + chunk], dtype=np.float64)
            d = csq[None, :] - 2.0 * xb @ c.T  # + |x|^2, the same for every centroid
            out[s : s + chunk] = self.centroid_cluster[np.argmin(d, axis=1)]
        return out


def _assign(features: np.ndarray, clusters: "PoolClusters") -> np.ndarray:
    return clusters.assign(features)


def feature_key(pool: PoolView) -> str:
    """A cheap fingerprint of the pool's ids and features: a new feature version gives a new key
    (for a pool held by shard actors: those actors, which the run replaces on a refresh)."""
    if pool.features is None and pool.shards is not None:
        return f"shards-{id(pool.shards)}-{len(pool)}"
    ids = hashlib.sha1(np.ascontiguousarray(pool.ids).tobytes()).hexdigest()
    return f"{ids}-{pool.features.shape}-{row_fingerprint(pool.features)}"


def sample_positions(n_rows: int, sample_size: int, seed: int) -> np.ndarray:
    """The pool positions the clustering is fitted on: a seeded sample of ``sample_size``, sorted."""
    if n_rows <= sample_size:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=sample_size, replace=False))


def _fit_clusters_from_shards(pieces, n_sample: int, threads: int, kwargs: dict) -> "PoolClusters":
    """Ray task: fetch the sample's rows from the shard actors and cluster them, so the sample
    (up to ``sample_size`` x D floats: 410 MB at 200,000 x 512) never enters the driver."""
    from asvp_ray.runtime.device import set_compute_threads
    from asvp_ray.pool.store_shards import gather_rows

    set_compute_threads(threads)
    S = gather_rows(pieces, n_sample)
    return fit_clusters(lambda rows: S, **kwargs)


def fit_clusters_on_shards(shards, n_rows: int, n_clusters: Optional[int], coarse_clusters: int, sample_size: int,
                           kmeans_iters: int, seed: int, key: str = "") -> "PoolClusters":
    """:func:`fit_clusters` for a pool held by shard actors (``StoreShards``), run in a Ray task
    that reads the sampled rows from the shards: the same sample, the same clusters, computed with
    this process's thread count (the task reserves no CPU, as the driver does not)."""
    import ray
    import torch

    rows = sample_positions(n_rows, sample_size, seed)
    pieces = shards.rows_at_refs(rows)
    from asvp_ray.runtime.placement import cpu_options

    task = ray.remote(_fit_clusters_from_shards).options(num_cpus=0, **cpu_options())
    kwargs = dict(n_clusters=n_clusters, coarse_clusters=coarse_clusters, sample_size=sample_size,
                  kmeans_iters=kmeans_iters, seed=seed, key=key, n_rows=n_rows)
    return ray.get(task.remote(pieces, len(rows), torch.get_num_threads(), kwargs))


def fit_clusters(X, n_clusters: Optional[int], coarse_clusters: int, sample_size: int,
                 kmeans_iters: int, seed: int, key: str = "", n_rows: Optional[int] = None) -> PoolClusters:
    """Cluster the rows of ``X``: k-means on a seeded sample, then average-linkage HAC on the centroids.

    Args:
        X: float (N, D) features (a memory map is read only at the sampled rows), or a function
            ``rows -> features`` (pool shards) with ``n_rows``.
        n_clusters: clusters after HAC; None: ``round(sqrt(N))`` clipped to [2, coarse centroids].
        coarse_clusters: k-means centroids (at most the sample size).
        sample_size: rows k-means is trained on.
        kmeans_iters: k-means iterations.
        seed: seed of the sample and of k-means.
    """
    from sklearn.cluster import AgglomerativeClustering

    N = int(n_rows) if callable(X) else len(X)
    rows = sample_positions(N, sample_size, seed)
    S = as_f32(X(rows) if callable(X) else X[rows])
    k = int(min(coarse_clusters, len(S)))
    if k == len(S):
        centroids = S
    else:
        centroids = train_kmeans(S, k, seed, kmeans_iters,
                                 max_points_per_centroid=max(1, math.ceil(len(S) / k))).centroids
    want = n_clusters if n_clusters is not None else int(np.clip(round(math.sqrt(N)), 2, k))
    want = int(min(want, k))
    if want >= k or k < 2:
        labels = np.arange(k, dtype=np.int64)
    else:
        labels = AgglomerativeClustering(n_clusters=want, linkage="average").fit_predict(centroids)
    return PoolClusters(centroids, labels, key)


def round_robin(positions: np.ndarray, clusters: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` of ``positions`` picked round-robin over their clusters, smallest cluster first.

    Within a cluster the order is random (``rng``); clusters of equal size go by cluster id. Pass
    ``k`` takes the ``k``-th member of every cluster that still has one, so the first picks cover
    as many clusters as there are.
    """
    positions = np.asarray(positions, dtype=np.int64)
    clusters = np.asarray(clusters, dtype=np.int64)
    uniq, inverse, sizes = np.unique(clusters, return_inverse=True, return_counts=True)
    cluster_rank = np.empty(len(uniq), dtype=np.int64)
    cluster_rank[np.lexsort((uniq, sizes))] = np.arange(len(uniq))
    shuffled = rng.permutation(len(positions))
    # rank of each member inside its cluster, in the shuffled order
    order = shuffled[np.argsort(inverse[shuffled], kind="stable")]
    member_rank = np.empty(len(positions), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    member_rank[order] = np.arange(len(positions)) - np.repeat(starts, sizes)
    pick = np.lexsort((cluster_rank[inverse], member_rank))[:n]
    return positions[pick]


@STRATEGIES.register("cluster_margin")
class ClusterMargin(Strategy):
    """Margin shortlist, diversified round-robin over clusters of the pool (Cluster-Margin).

    Args:
        margin_factor: the shortlist holds ``margin_factor x n`` lowest-margin rows (the paper's
            ``k_m``; 10 there). 1 gives plain margin sampling.
        n_clusters: clusters of the pool; None: ``sqrt(pool size)``, at most ``coarse_clusters``.
        coarse_clusters: k-means centroids that HAC merges (memory and time grow with its square).
        sample_size: pool rows the clustering is fitted on (seeded sample).
        kmeans_iters: k-means iterations.
        seed: seed of the clustering (the same clusters for a feature version, also after a resume).
        execution, num_shards, shard_min_rows, actor_options: where the margin shortlist is scored
            (see :class:`~asvp_ray.selection.sharded.ExecutionOptions`).
    """

    name = "cluster_margin"

    def __init__(
        self,
        margin_factor: float = 10.0,
        n_clusters: Optional[int] = None,
        coarse_clusters: int = 1024,
        sample_size: int = 200_000,
        kmeans_iters: int = 20,
        seed: int = 0,
        execution: str = "auto",
        num_shards: Optional[int] = None,
        shard_min_rows: int = DEFAULT_SHARD_MIN_ROWS,
        actor_options: Optional[dict] = None,
    ):
        where = "cluster_margin"
        if not is_number(margin_factor, minimum=1):
            raise ConfigError(f"{where}: margin_factor={margin_factor!r} must be a number >= 1 (the paper uses 10)")
        if n_clusters is not None and not is_int(n_clusters, minimum=2):
            raise ConfigError(f"{where}: n_clusters={n_clusters!r} must be an integer >= 2, or null (sqrt of the pool)")
        for key, value in (("coarse_clusters", coarse_clusters), ("sample_size", sample_size),
                           ("kmeans_iters", kmeans_iters)):
            check_int(where, key, value)
        if not is_int(seed, minimum=0):
            raise ConfigError(f"{where}: seed={seed!r} must be an integer >= 0")
        self.margin_factor = float(margin_factor)
        self.n_clusters = n_clusters
        self.coarse_clusters = int(coarse_clusters)
        self.sample_size = int(sample_size)
        self.kmeans_iters = int(kmeans_iters)
        self.seed = int(seed)
        self.shortlist = ShardedStrategy(MarginSampling(), execution=execution, num_shards=num_shards,
                                         shard_min_rows=shard_min_rows, actor_options=actor_options)
        self.shortlist.exec_options.check(where)
        self.clusters_: Optional[PoolClusters] = None
        self.last_stats_: dict = {}

    def clusters_for(self, pool: PoolView) -> PoolClusters:
        """The clustering of ``pool``'s feature version, fitted on first use and kept until the
        features change."""
        X = need_features(self.name, pool, sharded_ok=True)
        key = feature_key(pool)
        if self.clusters_ is None or self.clusters_.key != key:
            if X is None and hasattr(pool.shards, "rows_at_refs"):  # the sample goes from the shards to a task
                self.clusters_ = fit_clusters_on_shards(pool.shards, len(pool), self.n_clusters, self.coarse_clusters,
                                                        self.sample_size, self.kmeans_iters, self.seed, key)
            else:
                source = pool.shards.rows_at if X is None else X
                self.clusters_ = fit_clusters(source, self.n_clusters, self.coarse_clusters, self.sample_size,
                                              self.kmeans_iters, self.seed, key, n_rows=len(pool))
            log.info("cluster_margin: %d rows in %d clusters (%d centroids)", len(pool), self.clusters_.n_clusters,
                     len(self.clusters_.centroids))
        return self.clusters_

    def _select_positions(self, pool: PoolView, n: int, rng: np.random.Generator) -> np.ndarray:
        clusters = self.clusters_for(pool)
        k = int(min(pool.n_unlabeled, math.ceil(self.margin_factor * n)))
        short = np.asarray(self.shortlist._select_positions(pool, k, rng), dtype=np.int64)
        rows = np.sort(short)
        if pool.features is None and hasattr(pool.shards, "map_rows"):  # assigned where the rows are
            labels = pool.shards.map_rows(rows, _assign, clusters)
        else:
            feats = pool.shards.rows_at(rows) if pool.features is None else pool.features[rows]
            labels = clusters.assign(feats)
        labels = labels[np.argsort(np.argsort(short))]  # back to the shortlist's order
        picks = round_robin(short, labels, n, rng)
        self.last_stats_ = {"shortlist": k, "clusters_in_shortlist": int(len(np.unique(labels))),
                            "clusters_in_batch": int(len(np.unique(labels[np.isin(short, picks)])))}
        return picks

    def __repr__(self) -> str:
        return (f"ClusterMargin(margin_factor={self.margin_factor}, n_clusters={self.n_clusters}, "
                f"execution={self.shortlist.execution!r})")

