"""The contract every query strategy passes, shared by tests/test_strategies.py (score-based
and random) and tests/test_diversity.py (feature-based): subclass ``StrategyContract``, set ``name``,
and override ``pool`` when the strategy needs more than class probabilities (features)."""
from __future__ import annotations

import numpy as np
import pytest

from asvp_ray.core.errors import BadInputError, EmptyPoolError, PoolExhaustedError
from asvp_ray.pool.view import PoolView
from asvp_ray.selection import STRATEGIES

N_POOL = 60
N_CLASSES = 4


def pool_ids(n: int) -> np.ndarray:
    # Ids deliberately unlike positions, so a position leaking out is caught.
    return 1000 + 7 * np.arange(n, dtype=np.int64)


def random_probs(n: int, c: int, seed: int, n_dup_rows: int = 5) -> np.ndarray:
    """Dirichlet rows, a third of them copies of a few rows so that exact score ties occur."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(c), size=n).astype(np.float32)
    dup = rng.choice(n, size=n // 3, replace=False)
    probs[dup] = probs[rng.integers(0, n_dup_rows, size=len(dup))]
    return probs


def make_pool(n: int = N_POOL, labeled: int = 10, seed: int = 0, chunk_size: int = 65536) -> PoolView:
    rng = np.random.default_rng(seed)
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=labeled, replace=False)] = True
    return PoolView(
        ids=pool_ids(n), labeled_mask=mask, probs=random_probs(n, N_CLASSES, seed), chunk_size=chunk_size
    )


class StrategyContract:
    """Tests every registered strategy must pass; subclasses set ``name``."""

    name: str

    def make(self):
        return STRATEGIES.create(self.name)

    def pool(self, **kwargs) -> PoolView:
        """The contract's pool (``make_pool`` arguments); feature strategies add features."""
        return make_pool(**kwargs)

    def test_registered(self):
        assert self.name in STRATEGIES.names()
        assert STRATEGIES.create(self.name).name == self.name

    @pytest.mark.parametrize("n", [1, 7, 50])
    def test_returns_n_distinct_unlabelled_int64_ids(self, n):
        pool = self.pool(labeled=10)
        ids = self.make().select(pool, n, np.random.default_rng(0))
        assert ids.dtype == np.int64 and ids.shape == (n,)
        assert len(np.unique(ids)) == n
        labelled_ids = set(pool.ids[pool.labeled_mask].tolist())
        assert labelled_ids.isdisjoint(ids.tolist())
        # Pool ids, not positions: every id is one of 1000 + 7 i.
        assert np.isin(ids, pool.ids).all()
        assert ((ids - 1000) % 7 == 0).all() and ids.min() >= 1000

    def test_select_all_unlabelled(self):
        pool = self.pool(labeled=10)
        ids = self.make().select(pool, pool.n_unlabeled, np.random.default_rng(0))
        assert sorted(ids.tolist()) == sorted(pool.ids[~pool.labeled_mask].tolist())

    def test_n_above_unlabelled_raises_pool_exhausted(self):
        pool = self.pool(labeled=10)
        with pytest.raises(PoolExhaustedError, match=r"51.*50.*lower the round budget"):
            self.make().select(pool, 51, np.random.default_rng(0))

    def test_fully_labelled_pool_raises_empty(self):
        pool = self.pool(labeled=N_POOL)
        with pytest.raises(EmptyPoolError, match="no unlabelled samples"):
            self.make().select(pool, 1, np.random.default_rng(0))

    @pytest.mark.parametrize("n", [0, -3, 2.0, True, None])
    def test_bad_n_raises(self, n):
        with pytest.raises(BadInputError, match="positive integer"):
            self.make().select(self.pool(), n, np.random.default_rng(0))

    def test_bad_rng_raises(self):
        with pytest.raises(BadInputError, match="Generator"):
            self.make().select(self.pool(), 3, 0)

    def test_same_seed_same_choice(self):
        pool = self.pool(labeled=10)
        a = self.make().select(pool, 12, np.random.default_rng(42))
        b = self.make().select(pool, 12, np.random.default_rng(42))
        np.testing.assert_array_equal(a, b)
