"""Query strategies: contract shared by every strategy, plus per-strategy choices."""
from __future__ import annotations

import numpy as np
import pytest

from asvp_ray.core.errors import BadInputError, ConfigError
from asvp_ray.pool.view import PoolView
from asvp_ray.selection import STRATEGIES, ScoreStrategy, top_n
from tests.contracts import N_CLASSES, N_POOL, StrategyContract, make_pool, pool_ids, random_probs  # noqa: F401

def naive_select(strategy: ScoreStrategy, probs: np.ndarray, ids: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """Reference: score everything, full sort by (score desc, id asc), take n."""
    scores = strategy.score(probs[~mask]).astype(np.float64)
    cand = ids[~mask]
    order = sorted(range(len(cand)), key=lambda i: (-scores[i], cand[i]))
    return cand[np.array(order[:n], dtype=np.int64)]


class ScoreContract(StrategyContract):
    """Extra tests for score-based strategies."""

    @pytest.mark.parametrize("chunk_size", [1, 3, 8, 17, 64, 65536])
    @pytest.mark.parametrize("n", [1, 10, 25])
    def test_matches_naive_full_sort(self, chunk_size, n):
        # chunk_size < n exercises the running top-n merging across many chunks.
        n_pool = 120
        probs = random_probs(n_pool, N_CLASSES, seed=3)
        mask = np.zeros(n_pool, dtype=bool)
        mask[np.random.default_rng(4).choice(n_pool, 30, replace=False)] = True
        ids = pool_ids(n_pool)
        pool = PoolView(ids=ids, labeled_mask=mask, probs=probs, chunk_size=chunk_size)
        strategy = self.make()
        got = strategy.select(pool, n, np.random.default_rng(0))
        np.testing.assert_array_equal(got, naive_select(strategy, probs, ids, mask, n))

    def test_ties_broken_by_lower_id(self):
        probs = np.tile(np.array([[0.4, 0.3, 0.2, 0.1]], dtype=np.float32), (9, 1))
        ids = np.array([50, 10, 90, 30, 70, 20, 80, 40, 60], dtype=np.int64)
        pool = PoolView(ids=ids, labeled_mask=np.zeros(9, bool), probs=probs, chunk_size=2)
        got = self.make().select(pool, 4, np.random.default_rng(0))
        np.testing.assert_array_equal(got, [10, 20, 30, 40])

    def test_model_path_equals_probs_path(self):
        class RowNormaliser:
            """Row-wise model, so chunking cannot change its outputs."""

            def __init__(self):
                self.calls = []

            def predict_proba(self, X):
                self.calls.append(len(X))
                return X / X.sum(axis=1, keepdims=True)

        feats = np.random.default_rng(5).uniform(0.1, 1.0, size=(50, N_CLASSES)).astype(np.float32)
        mask = np.zeros(50, dtype=bool)
        mask[::4] = True
        model = RowNormaliser()
        by_model = PoolView(ids=pool_ids(50), features=feats, labeled_mask=mask, model=model, chunk_size=16)
        by_probs = PoolView(
            ids=pool_ids(50), labeled_mask=mask, probs=model.predict_proba(feats), chunk_size=16
        )
        model.calls.clear()
        a = self.make().select(by_model, 9, np.random.default_rng(0))
        b = self.make().select(by_probs, 9, np.random.default_rng(0))
        np.testing.assert_array_equal(a, b)
        assert max(model.calls) <= 16 and sum(model.calls) == 50 - mask.sum()

    def test_precomputed_probs_win_over_model(self):
        class Exploding:
            def predict_proba(self, X):
                raise AssertionError("model must not be used when probs are given")

        pool = self.pool()
        pool.model, pool.features = Exploding(), np.zeros((N_POOL, 3), np.float32)
        assert len(self.make().select(pool, 5, np.random.default_rng(0))) == 5

    def test_needs_probs_or_model(self):
        pool = PoolView(ids=pool_ids(5), labeled_mask=np.zeros(5, bool))
        with pytest.raises(BadInputError, match="needs class probabilities"):
            self.make().select(pool, 2, np.random.default_rng(0))

    def test_nan_probabilities_raise(self):
        pool = self.pool(labeled=0)
        pool.probs[7] = np.nan
        with pytest.raises(BadInputError, match="1049"):
            self.make().select(pool, 3, np.random.default_rng(0))


# Hand-made rows where the three uncertainty measures disagree about the top pick:
#   A margin 0 (margin's pick); B max .40 (least-confidence's pick); E entropy 1.33 (entropy's);
#   F would win all three but is labelled.
HAND = np.array(
    [
        [0.70, 0.10, 0.10, 0.10],  # C
        [0.45, 0.45, 0.05, 0.05],  # A
        [0.97, 0.01, 0.01, 0.01],  # D
        [0.40, 0.30, 0.30, 0.00],  # B
        [0.41, 0.20, 0.20, 0.19],  # E
        [0.25, 0.25, 0.25, 0.25],  # F (labelled)
    ],
    dtype=np.float32,
)
HAND_IDS = pool_ids(len(HAND))
HAND_MASK = np.array([False, False, False, False, False, True])


def hand_pool(chunk_size: int = 65536) -> PoolView:
    return PoolView(ids=HAND_IDS, labeled_mask=HAND_MASK, probs=HAND.copy(), chunk_size=chunk_size)


class TestRandom(StrategyContract):
    name = "random"

    def test_different_seeds_differ_and_cover_pool(self):
        pool = make_pool(labeled=10)
        unlabelled = set(pool.ids[~pool.labeled_mask].tolist())
        picks = [tuple(self.make().select(pool, 5, np.random.default_rng(s)).tolist()) for s in range(600)]
        assert len(set(picks)) == len(picks)  # every seed its own batch
        assert all(len(set(p)) == 5 for p in picks)  # no id twice in a batch
        chosen = {i for p in picks for i in p}
        # 3,000 draws over the unlabelled ids reach every one of them and never a labelled one
        assert chosen == unlabelled

    def test_needs_no_probs(self):
        pool = PoolView(ids=pool_ids(10), labeled_mask=np.zeros(10, bool))
        assert len(self.make().select(pool, 10, np.random.default_rng(1))) == 10

    def test_roughly_uniform(self):
        pool = PoolView(ids=pool_ids(10), labeled_mask=np.zeros(10, bool))
        rng = np.random.default_rng(0)
        counts = np.zeros(10)
        for _ in range(2000):
            counts[(self.make().select(pool, 1, rng) - 1000) // 7] += 1
        assert counts.min() > 150 and counts.max() < 250


class TestMargin(ScoreContract):
    name = "margin"

    def test_hand_made_order(self):
        # margins of unlabelled rows C A D B E: .60 .00 .96 .10 .21
        got = self.make().select(hand_pool(chunk_size=2), 5, np.random.default_rng(0))
        np.testing.assert_array_equal(got, HAND_IDS[[1, 3, 4, 0, 2]])

    def test_score_is_minus_top1_top2_gap(self):
        gap = np.sort(HAND, axis=1)[:, -1] - np.sort(HAND, axis=1)[:, -2]
        np.testing.assert_allclose(self.make().score(HAND), -gap, atol=1e-7)

    def test_single_class_rejected(self):
        with pytest.raises(BadInputError, match="at least 2 classes"):
            self.make().score(np.ones((3, 1), np.float32))


class TestEntropy(ScoreContract):
    name = "entropy"

    def test_hand_made_top_pick(self):
        got = self.make().select(hand_pool(), 2, np.random.default_rng(0))
        np.testing.assert_array_equal(got, HAND_IDS[[4, 3]])

    def test_score_is_entropy_with_zeros(self):
        p = HAND.astype(np.float64)
        expected = -np.array([sum(x * np.log(x) for x in row if x > 0) for row in p])
        np.testing.assert_allclose(self.make().score(HAND), expected, rtol=1e-6)
        assert self.make().score(np.array([[1.0, 0.0]]))[0] == 0.0


class TestLeastConfidence(ScoreContract):
    name = "least_confidence"

    def test_hand_made_top_pick(self):
        got = self.make().select(hand_pool(chunk_size=1), 3, np.random.default_rng(0))
        # lowest max prob: B (.40), E (.41), A (.45)
        np.testing.assert_array_equal(got, HAND_IDS[[3, 4, 1]])


def test_registry_names_and_typo_hint():
    assert {"random", "margin", "entropy", "least_confidence"} <= set(STRATEGIES.names())
    with pytest.raises(ConfigError, match="Did you mean 'margin'"):
        STRATEGIES.create("margni")


@pytest.mark.parametrize("seed", range(5))
def test_top_n_matches_sort(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=40).astype(np.float64)  # many ties
    ids = rng.permutation(1000)[:40].astype(np.int64)
    for n in (1, 5, 39, 40, 60):
        got = set(top_n(scores, ids, n).tolist())
        want = set(sorted(range(40), key=lambda i: (-scores[i], ids[i]))[:n])
        assert got == want


def test_pool_view_validation():
    with pytest.raises(BadInputError, match="duplicate"):
        PoolView(ids=np.array([1, 2, 2]), labeled_mask=np.zeros(3, bool))
    with pytest.raises(BadInputError, match="labeled_mask"):
        PoolView(ids=np.arange(3), labeled_mask=np.zeros(4, bool))
    with pytest.raises(BadInputError, match="features"):
        PoolView(ids=np.arange(3), labeled_mask=np.zeros(3, bool), features=np.zeros((2, 5), np.float32))
    with pytest.raises(BadInputError, match="probs"):
        PoolView(ids=np.arange(3), labeled_mask=np.zeros(3, bool), probs=np.zeros(3))


def test_pool_view_chunks_cover_unlabelled_once():
    pool = make_pool(labeled=10, chunk_size=7)
    seen = np.concatenate([pos for pos, probs in pool.iter_proba_chunks()])
    np.testing.assert_array_equal(seen, pool.unlabeled_positions())
    assert pool.n_unlabeled == N_POOL - 10


@pytest.mark.parametrize("name", ["margin", "entropy", "least_confidence"])
def test_with_fitted_mlp_proxy(name):
    from asvp_ray.proxy.mlp import MLPProxy

    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1.5, size=(3, 8))
    y = rng.integers(0, 3, size=150)
    X = (centers[y] + rng.normal(size=(150, 8))).astype(np.float32)
    mask = np.zeros(150, dtype=bool)
    mask[:40] = True
    proxy = MLPProxy(epochs=5, batch_size=16, chunk_size=11).fit(X[mask], y[mask], num_classes=3)
    pool = PoolView(ids=pool_ids(150), features=X, labeled_mask=mask, model=proxy, chunk_size=32)
    strategy = STRATEGIES.create(name)
    ids = strategy.select(pool, 12, np.random.default_rng(0))
    pos = (ids - 1000) // 7
    assert not mask[pos].any() and len(set(pos.tolist())) == 12
    # The picks are the 12 highest-scoring unlabelled rows (up to float noise from chunking).
    scores = strategy.score(proxy.predict_proba(X))
    others = np.setdiff1d(np.flatnonzero(~mask), pos)
    assert scores[pos].min() >= scores[others].max() - 1e-5
