"""Diversity, hybrid and coverage strategies: equality with naive implementations, caches,
sharded execution (local Ray and a two-node cluster in a subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from asvp_ray.core.errors import BadInputError, ConfigError
from asvp_ray.pool.view import PoolView
from asvp_ray.selection import STRATEGIES
from asvp_ray.selection._graph import delta_graph, graph_recall
from asvp_ray.selection.typiclust import knn_mean_sqdist
from asvp_ray.selection.badge import gradient_embedding_parts, gradient_embedding_sqdist
from asvp_ray.pool.shards import shard_bounds
from asvp_ray.selection.sharded import ShardedStrategy, resolve_execution
from tests.contracts import N_POOL, StrategyContract, make_pool, pool_ids

ROOT = Path(__file__).resolve().parents[1]


def pool_with_features(n: int = N_POOL, labeled: int = 10, seed: int = 0, chunk_size: int = 65536) -> PoolView:
    """The contract's pool plus seeded Gaussian features (8-d, no duplicate rows)."""
    pool = make_pool(n=n, labeled=labeled, seed=seed, chunk_size=chunk_size)
    pool.features = np.random.default_rng(100 + seed).standard_normal((n, 8)).astype(np.float32)
    return pool


class FeatureContract(StrategyContract):
    """The shared contract, run on pools that also carry features."""

    kwargs: dict = {}

    def pool(self, **kwargs) -> PoolView:
        return pool_with_features(**kwargs)

    def make(self):
        return STRATEGIES.create(self.name, **self.kwargs)

    def test_needs_features(self):
        pool = self.pool()
        pool.features = None
        with pytest.raises(BadInputError, match="needs PoolView.features"):
            self.make().select(pool, 3, np.random.default_rng(0))


def random_pool(n: int, d: int, labeled: int, seed: int, c: int = 4, chunk_size: int = 65536, clustered: bool = False):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    if clustered:
        X += 4.0 * rng.standard_normal((5, d)).astype(np.float32)[rng.integers(0, 5, n)]
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=labeled, replace=False)] = True
    probs = rng.dirichlet(np.ones(c), size=n).astype(np.float32)
    return PoolView(ids=pool_ids(n), features=X, labeled_mask=mask, probs=probs, chunk_size=chunk_size)


def to_ids(pool: PoolView, positions) -> np.ndarray:
    return pool.ids[np.asarray(positions, dtype=np.int64)]


# ============================================================================ naive references
def naive_coreset(X, mask, n, rng, metric="euclidean"):
    """Direct k-center greedy in float64: full distance vector per centre, argmax per pick."""
    X = X.astype(np.float64)

    def dist(c):
        if metric == "euclidean":
            return ((X - c) ** 2).sum(axis=1)
        nrm = np.linalg.norm(X, axis=1) * np.linalg.norm(c)
        return 1.0 - (X @ c) / np.where(nrm > 0, nrm, np.inf)

    taken = mask.copy()
    mind = np.full(len(X), np.inf)
    for j in np.flatnonzero(mask):
        mind = np.minimum(mind, dist(X[j]))
    picks = []
    if not mask.any():
        free = np.flatnonzero(~taken)
        picks.append(int(free[rng.integers(len(free))]))
        taken[picks[-1]] = True
        mind = np.minimum(mind, dist(X[picks[-1]]))
    while len(picks) < n:
        p = int(np.argmax(np.where(taken, -np.inf, mind)))
        picks.append(p)
        taken[p] = True
        mind = np.minimum(mind, dist(X[p]))
    return np.array(picks)


def naive_badge(E, H, n, rng, first="random"):
    """k-means++ on explicitly materialised gradient embeddings (float64)."""
    G = (E[:, :, None].astype(np.float64) * H[:, None, :].astype(np.float64)).reshape(len(E), -1)
    m = len(G)
    taken = np.zeros(m, dtype=bool)
    c = int(rng.integers(m)) if first == "random" else int(np.argmax((G**2).sum(axis=1)))
    picks, d2 = [c], np.full(m, np.inf)
    taken[c] = True
    while len(picks) < n:
        d2 = np.minimum(d2, ((G - G[c]) ** 2).sum(axis=1))
        w = np.where(taken, 0.0, d2)
        if w.sum() > 0:
            c = int(np.searchsorted(np.cumsum(w), rng.random() * w.sum(), side="right"))
        else:
            free = np.flatnonzero(~taken)
            c = int(free[rng.integers(len(free))])
        picks.append(c)
        taken[c] = True
    return np.array(picks)


def naive_typiclust(X, mask, n, rng, k_nn=20, max_clusters=500, min_size=5):
    """TypiClust as the authors' loop runs it, with sklearn k-means and full distance matrices."""
    from sklearn.cluster import KMeans

    N = len(X)
    K = max(1, min(int(mask.sum()) + n, max_clusters, N))
    seed = int(rng.integers(2**31 - 1))
    labels = KMeans(n_clusters=K, n_init=1, max_iter=20, random_state=seed).fit_predict(X.astype(np.float32))
    sizes = np.bincount(labels, minlength=K)
    have = np.bincount(labels[mask], minlength=K)
    order = sorted(range(K), key=lambda c: (have[c], -sizes[c], c))
    groups = ([c for c in order if sizes[c] > min_size], [c for c in order if 0 < sizes[c] <= min_size])
    free = ~mask
    picks = []
    for group in groups:
        while len(picks) < n:
            progressed = False
            for c in group:
                idx = np.flatnonzero((labels == c) & free)
                if not len(idx):
                    continue
                if len(idx) == 1:
                    p = int(idx[0])
                else:
                    kk = min(k_nn, len(idx) // 2)
                    F = X[idx].astype(np.float64)
                    D = ((F[:, None, :] - F[None, :, :]) ** 2).sum(axis=2)
                    np.fill_diagonal(D, np.inf)
                    mean = np.sort(D, axis=1)[:, :kk].mean(axis=1)
                    p = int(idx[np.argmax(1.0 / (mean + 1e-5))])
                picks.append(p)
                free[p] = False
                progressed = True
                if len(picks) == n:
                    break
            if not progressed:
                break
    return np.array(picks)


def naive_probcover(X, mask, n, rng, delta, normalize=True):
    """ProbCover as the authors' loop runs it: an edge list, degrees by bincount per pick."""
    F = X.astype(np.float64)
    if normalize:
        F /= np.linalg.norm(F, axis=1, keepdims=True)
    dist = np.sqrt(((F[:, None, :] - F[None, :, :]) ** 2).sum(axis=2))
    xs, ys = np.nonzero(dist < delta)
    covered = np.unique(ys[np.isin(xs, np.flatnonzero(mask))])
    keep = ~np.isin(ys, covered)
    xs, ys = xs[keep], ys[keep]
    picks = []
    for _ in range(n):
        deg = np.bincount(xs, minlength=len(X))
        if deg.max() == 0:
            break
        cur = int(deg.argmax())
        new = ys[xs == cur]
        keep = ~np.isin(ys, new)
        xs, ys = xs[keep], ys[keep]
        picks.append(cur)
    if len(picks) < n:
        taken = mask.copy()
        taken[picks] = True
        rest = np.flatnonzero(~taken)
        picks += rest[rng.choice(len(rest), size=n - len(picks), replace=False)].tolist()
    return np.array(picks)


# ============================================================================ coreset
class TestCoreset(FeatureContract):
    name = "coreset"
    kwargs = {"execution": "local"}

    @pytest.mark.parametrize("metric", ["euclidean", "cosine"])
    @pytest.mark.parametrize("prune", [True, False])
    @pytest.mark.parametrize("labeled,chunk", [(0, 65536), (7, 13), (40, 64)])
    def test_matches_naive(self, metric, prune, labeled, chunk):
        pool = random_pool(300, 6, labeled, seed=labeled + 1, chunk_size=chunk, clustered=True)
        got = STRATEGIES.create("coreset", metric=metric, prune=prune, execution="local").select(
            pool, 60, np.random.default_rng(3)
        )
        want = naive_coreset(pool.features, pool.labeled_mask, 60, np.random.default_rng(3), metric)
        np.testing.assert_array_equal(got, to_ids(pool, want))

    def test_pruned_reads_less_than_dense(self):
        pool = random_pool(2000, 8, 20, seed=5, clustered=True)
        lazy = STRATEGIES.create("coreset", execution="local")
        dense = STRATEGIES.create("coreset", prune=False, execution="local")
        a = lazy.select(pool, 100, np.random.default_rng(0))
        b = dense.select(pool, 100, np.random.default_rng(0))
        np.testing.assert_array_equal(a, b)
        assert lazy.stats()[0]["dist_evals"] < dense.stats()[0]["dist_evals"] / 2

    def test_cache_across_rounds_matches_naive(self):
        # Round 1 labels every pick plus others; round 2 labels only part of the picks (the
        # cache must then be rebuilt); round 3 is again incremental.
        pool = random_pool(400, 5, 10, seed=7, clustered=True)
        X, mask = pool.features, pool.labeled_mask.copy()
        strategy = STRATEGIES.create("coreset", execution="local")
        extra = np.random.default_rng(8)
        for rnd, keep in enumerate([30, 18, 30]):
            view = PoolView(ids=pool.ids, features=X, labeled_mask=mask.copy())
            got = strategy.select(view, 30, np.random.default_rng(rnd))
            want = naive_coreset(X, mask, 30, np.random.default_rng(rnd))
            np.testing.assert_array_equal(got, to_ids(pool, want))
            mask[want[:keep]] = True
            mask[extra.choice(np.flatnonzero(~mask), 4, replace=False)] = True
        # Same features object: the cached holder is reused; new feature values: rebuilt.
        view = PoolView(ids=pool.ids, features=X, labeled_mask=mask.copy())
        strategy.select(view, 5, np.random.default_rng(0))
        held = strategy._local["group"]
        strategy.select(PoolView(ids=pool.ids, features=X, labeled_mask=mask.copy()), 5, np.random.default_rng(0))
        assert strategy._local["group"] is held
        X2 = X + 1.0
        got = strategy.select(PoolView(ids=pool.ids, features=X2, labeled_mask=mask.copy()), 10, np.random.default_rng(0))
        assert strategy._local["group"] is not held
        np.testing.assert_array_equal(got, to_ids(pool, naive_coreset(X2, mask, 10, np.random.default_rng(0))))

    def test_cache_seeds_from_rows_labelled_elsewhere(self):
        # Between rounds the driver labels rows the strategy never picked: they become centres.
        pool = random_pool(300, 4, 5, seed=9, clustered=True)
        strategy = STRATEGIES.create("coreset", execution="local")
        mask = pool.labeled_mask.copy()
        first = strategy.select(PoolView(ids=pool.ids, features=pool.features, labeled_mask=mask.copy()), 10, np.random.default_rng(0))
        mask[(first - 1000) // 7] = True
        mask[np.flatnonzero(~mask)[:25]] = True
        got = strategy.select(PoolView(ids=pool.ids, features=pool.features, labeled_mask=mask.copy()), 20, np.random.default_rng(0))
        np.testing.assert_array_equal(got, to_ids(pool, naive_coreset(pool.features, mask, 20, np.random.default_rng(0))))

    def test_bad_kwargs(self):
        with pytest.raises(ConfigError, match="metric='manhattan'"):
            STRATEGIES.create("coreset", metric="manhattan").select(pool_with_features(), 2, np.random.default_rng(0))
        with pytest.raises(ConfigError, match="execution='cluster'"):
            STRATEGIES.create("coreset", execution="cluster").select(pool_with_features(), 2, np.random.default_rng(0))

    def test_nan_features_raise(self):
        pool = pool_with_features()
        pool.features[17, 3] = np.nan
        with pytest.raises(BadInputError, match="row 17"):
            STRATEGIES.create("coreset", execution="local").select(pool, 2, np.random.default_rng(0))


# ============================================================================ BADGE
class TestBadge(FeatureContract):
    name = "badge"
    kwargs = {"execution": "local"}

    @pytest.mark.parametrize("first", ["random", "max_norm"])
    @pytest.mark.parametrize("labeled,chunk", [(0, 65536), (12, 7), (50, 64)])
    @pytest.mark.parametrize("dim", [5, 16])  # 4 C > H: norm bound; 4 C <= H: class-factor bound
    def test_matches_naive(self, first, labeled, chunk, dim):
        pool = random_pool(250, dim, labeled, seed=labeled + 2, c=3, chunk_size=chunk, clustered=True)
        got = STRATEGIES.create("badge", first=first, execution="local").select(pool, 60, np.random.default_rng(4))
        un = pool.unlabeled_positions()
        E = gradient_embedding_parts(pool.probs[un])
        want = un[naive_badge(E, pool.features[un], 60, np.random.default_rng(4), first)]
        np.testing.assert_array_equal(got, to_ids(pool, want))

    def test_bound_skips_most_rows_and_stays_exact(self):
        # Confident probabilities (one class per cluster): most rows cannot move to a centre
        # of another class, and the class-factor bound proves it without their H products.
        rng = np.random.default_rng(3)
        n_rows, c = 3000, 5
        cluster = rng.integers(0, c, n_rows)
        X = (3.0 * rng.standard_normal((c, 24))[cluster] + rng.standard_normal((n_rows, 24))).astype(np.float32)
        logits = 6.0 * np.eye(c)[cluster] + rng.standard_normal((n_rows, c))
        probs = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
        mask = np.zeros(n_rows, dtype=bool)
        mask[:30] = True
        pool = PoolView(ids=pool_ids(n_rows), features=X, labeled_mask=mask, probs=probs, chunk_size=4096)
        strategy = STRATEGIES.create("badge", execution="local")
        got = strategy.select(pool, 80, np.random.default_rng(0))
        un = pool.unlabeled_positions()
        want = un[naive_badge(gradient_embedding_parts(probs[un]), X[un], 80, np.random.default_rng(0))]
        np.testing.assert_array_equal(got, to_ids(pool, want))
        evals = strategy.last_stats_[0]["dist_evals"]
        assert evals < 0.5 * len(un) * 80, evals

    def test_factorised_distance_equals_explicit(self):
        rng = np.random.default_rng(0)
        p = rng.dirichlet(np.ones(5), size=40)
        h = rng.standard_normal((40, 7))
        e = gradient_embedding_parts(p)
        g = np.einsum("ic,ih->ich", e.astype(np.float64), h).reshape(40, -1)
        for c in (0, 13, 39):
            explicit = ((g - g[c]) ** 2).sum(axis=1)
            got = gradient_embedding_sqdist(e, h.astype(np.float32), e[c], h[c].astype(np.float32))
            np.testing.assert_allclose(got, explicit, rtol=1e-4, atol=1e-4)
        assert (gradient_embedding_parts(p) <= 1).all() and np.allclose(e.sum(axis=1), 0, atol=1e-6)

    def test_with_mlp_proxy_uses_hidden_activations(self):
        from asvp_ray.proxy.mlp import MLPProxy

        pool = random_pool(200, 6, 40, seed=11, c=3, clustered=True)
        y = np.random.default_rng(0).integers(0, 3, 200)
        proxy = MLPProxy(hidden=9, epochs=3, batch_size=16, chunk_size=17).fit(
            pool.features[pool.labeled_mask], y[pool.labeled_mask], num_classes=3
        )
        view = PoolView(ids=pool.ids, features=pool.features, labeled_mask=pool.labeled_mask, model=proxy, chunk_size=32)
        got = STRATEGIES.create("badge", execution="local").select(view, 25, np.random.default_rng(1))
        un = view.unlabeled_positions()
        h, p = proxy.embed_and_proba(pool.features[un])
        want = un[naive_badge(gradient_embedding_parts(p), h, 25, np.random.default_rng(1))]
        np.testing.assert_array_equal(got, to_ids(pool, want))

    def test_duplicates_of_centres_fall_back_to_uniform(self):
        # Every unlabelled row is a copy of one row: all D^2 are 0 after the first pick.
        X = np.tile(np.array([[1.0, 2.0]], np.float32), (20, 1))
        probs = np.tile(np.array([[0.7, 0.3]], np.float32), (20, 1))
        pool = PoolView(ids=pool_ids(20), features=X, labeled_mask=np.zeros(20, bool), probs=probs)
        got = STRATEGIES.create("badge", execution="local").select(pool, 20, np.random.default_rng(0))
        assert sorted(got.tolist()) == sorted(pool.ids.tolist())

    def test_needs_probabilities(self):
        pool = pool_with_features()
        pool.probs = None
        with pytest.raises(BadInputError, match="badge needs class probabilities"):
            STRATEGIES.create("badge").select(pool, 2, np.random.default_rng(0))

    def test_bad_first(self):
        with pytest.raises(ConfigError, match="first='biggest'"):
            STRATEGIES.create("badge", first="biggest").select(pool_with_features(), 2, np.random.default_rng(0))


# ============================================================================ TypiClust
class TestTypiClust(FeatureContract):
    name = "typiclust"
    kwargs = {"backend": "sklearn"}

    # The last two revisit clusters many times: neighbour lists are updated incrementally.
    @pytest.mark.parametrize(
        "labeled,n,k_nn,max_clusters", [(0, 12, 20, 500), (15, 20, 5, 500), (30, 40, 20, 8), (20, 60, 3, 4)]
    )
    def test_matches_naive(self, labeled, n, k_nn, max_clusters):
        pool = random_pool(240, 5, labeled, seed=labeled + 3, clustered=True)
        strategy = STRATEGIES.create("typiclust", backend="sklearn", k_neighbors=k_nn, max_clusters=max_clusters)
        got = strategy.select(pool, n, np.random.default_rng(6))
        want = naive_typiclust(pool.features, pool.labeled_mask, n, np.random.default_rng(6), k_nn, max_clusters)
        np.testing.assert_array_equal(got, to_ids(pool, want))

    def test_faiss_backend_covers_clusters(self):
        pytest.importorskip("faiss")
        pool = random_pool(300, 6, 0, seed=4, clustered=True)
        strategy = STRATEGIES.create("typiclust", backend="faiss", max_clusters=10)
        got = strategy.select(pool, 10, np.random.default_rng(0))
        # One pick per cluster: the ten picks lie in ten different clusters.
        assert len(set(strategy.labels_[(got - 1000) // 7].tolist())) == 10

    def test_knn_mean_sqdist_is_exact(self):
        X = np.random.default_rng(1).standard_normal((50, 4)).astype(np.float32)
        D = ((X[:, None].astype(np.float64) - X[None]) ** 2).sum(axis=2)
        np.fill_diagonal(D, np.inf)
        np.testing.assert_allclose(knn_mean_sqdist(X, 6), np.sort(D, axis=1)[:, :6].mean(axis=1), rtol=1e-4)

    def test_bad_backend(self):
        with pytest.raises(ConfigError, match="backend='torch'"):
            STRATEGIES.create("typiclust", backend="torch").select(pool_with_features(), 2, np.random.default_rng(0))


# ============================================================================ ProbCover
class TestProbCover(FeatureContract):
    name = "probcover"

    @pytest.mark.parametrize("labeled,delta,normalize", [(0, 0.9, True), (10, 0.6, True), (25, 2.2, False), (5, 0.3, True)])
    def test_matches_naive(self, labeled, delta, normalize):
        pool = random_pool(220, 4, labeled, seed=labeled + 4, clustered=True)
        strategy = STRATEGIES.create("probcover", delta=delta, normalize=normalize)
        got = strategy.select(pool, 40, np.random.default_rng(2))
        want = naive_probcover(pool.features, pool.labeled_mask, 40, np.random.default_rng(2), delta, normalize)
        np.testing.assert_array_equal(got, to_ids(pool, want))

    def test_ivf_graph(self):
        X = random_pool(600, 6, 0, seed=1, clustered=True).features
        exact = delta_graph(X, 0.8, "exact")
        # Every cell a ball can reach is searched (no row truncated): the exact graph, while
        # skipping the cells beyond delta of the bisectors.
        full = delta_graph(X, 0.8, "ivf", nlist=16, nprobe=1000)
        assert full.stats["truncated_rows"] == 0 and full.stats["mean_probes"] < full.stats["nlist"]
        np.testing.assert_array_equal(full.indptr, exact.indptr)
        np.testing.assert_array_equal(full.indices, exact.indices)
        approx = delta_graph(X, 0.8, "ivf", nlist=16, nprobe=2)
        assert approx.stats["truncated_rows"] > 0
        assert 0.5 < graph_recall(approx, exact) < 1.0 and graph_recall(exact, exact) == 1.0
        assert approx.stats["pairs_computed"] < exact.stats["pairs_computed"]
        # Symmetric, self-loops included.
        A = approx.to_scipy()
        assert (A != A.T).nnz == 0 and (A.diagonal() == 1).all()

    def test_graph_is_cached_per_feature_version(self):
        pool = random_pool(200, 4, 5, seed=2)
        strategy = STRATEGIES.create("probcover", delta=0.9)
        strategy.select(pool, 5, np.random.default_rng(0))
        g = strategy._cache["graph"]
        strategy.select(pool, 5, np.random.default_rng(0))
        assert strategy._cache["graph"] is g
        pool.features = pool.features * 2.0 + 1.0
        strategy.select(pool, 5, np.random.default_rng(0))
        assert strategy._cache["graph"] is not g

    def test_bad_delta(self):
        with pytest.raises(ConfigError, match="delta=-1"):
            STRATEGIES.create("probcover", delta=-1).select(pool_with_features(), 2, np.random.default_rng(0))


# ============================================================================ execution switch
def test_execution_switch_defaults_by_pool_size():
    assert resolve_execution("local", 10**9, 100) == "local"
    assert resolve_execution("auto", 99, 100) == "local"
    assert resolve_execution("sharded", 5, 100) == "sharded"
    assert shard_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert shard_bounds(2, 5) == [(0, 1), (1, 2)]


def test_strategies_are_picklable_without_their_caches():
    import pickle

    s = STRATEGIES.create("coreset", execution="local")
    s.select(pool_with_features(), 3, np.random.default_rng(0))
    clone = pickle.loads(pickle.dumps(s))
    assert clone._local is None and clone.metric == "euclidean"


# ============================================================================ sharded over Ray
def sharded_vs_local(num_shards: int = 2, n_rows: int = 900) -> dict:
    """Run coreset (two rounds), badge and margin sharded and locally; report equality."""
    pool = random_pool(n_rows, 6, 20, seed=12, clustered=True)
    out = {}
    mask = pool.labeled_mask.copy()
    local = STRATEGIES.create("coreset", execution="local")
    shard = STRATEGIES.create("coreset", execution="sharded", num_shards=num_shards)
    try:
        for rnd in range(2):
            view = PoolView(ids=pool.ids, features=pool.features, labeled_mask=mask.copy())
            a = local.select(view, 40, np.random.default_rng(rnd))
            b = shard.select(view, 40, np.random.default_rng(rnd))
            out[f"coreset_round{rnd}"] = bool(np.array_equal(a, b))
            mask[(a - 1000) // 7] = True
            mask[np.flatnonzero(~mask)[:5]] = True
        out["nodes"] = len(set(shard._shards.group.node_ids()))
    finally:
        shard.close()
    for first in ("random", "max_norm"):
        bs = STRATEGIES.create("badge", execution="sharded", num_shards=num_shards, first=first)
        try:
            a = STRATEGIES.create("badge", execution="local", first=first).select(pool, 50, np.random.default_rng(5))
            b = bs.select(pool, 50, np.random.default_rng(5))
        finally:
            bs.close()
        out[f"badge_{first}"] = bool(np.array_equal(a, b))
    ms = ShardedStrategy(STRATEGIES.create("margin"), execution="sharded", num_shards=num_shards)
    try:
        a = STRATEGIES.create("margin").select(pool, 30, np.random.default_rng(0))
        b = ms.select(pool, 30, np.random.default_rng(0))
    finally:
        ms.close()
    out["margin"] = bool(np.array_equal(a, b))
    return out


def test_sharded_equals_local_on_local_ray(ray_local):
    result = sharded_vs_local(num_shards=2)
    assert all(v for k, v in result.items() if k != "nodes"), result


def test_sharded_strategy_rejects_non_score_strategies():
    with pytest.raises(ConfigError, match="coreset and badge shard themselves"):
        ShardedStrategy(STRATEGIES.create("coreset"), execution="local").select(
            pool_with_features(), 2, np.random.default_rng(0)
        )


def _two_node_main() -> None:
    """Child process: a two-node ``ray.cluster_utils.Cluster``, sharded vs local."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 150 * 2**20})
    cluster.add_node(num_cpus=1, object_store_memory=150 * 2**20)
    try:
        ray.init(address=cluster.address, include_dashboard=False, logging_level="ERROR")
        result = sharded_vs_local(num_shards=2, n_rows=1200)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(result))


@pytest.mark.slow
def test_sharded_equals_local_on_two_node_cluster():
    # A Cluster cannot live next to the session's local Ray instance: run it in a child.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), RAY_DEDUP_LOGS="0")
    proc = subprocess.run([sys.executable, __file__, "--two-node"], capture_output=True, text=True, timeout=420, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result.pop("nodes") == 2, result
    assert all(result.values()), result


if __name__ == "__main__" and "--two-node" in sys.argv:
    _two_node_main()
