"""Random sampling and uncertainty strategies on class probabilities.

Every score is "higher = more informative", so the base class's running top-n applies.
"""
from __future__ import annotations

import numpy as np

from asvp_ray.core.errors import BadInputError
from asvp_ray.pool.view import PoolView
from asvp_ray.selection.base import STRATEGIES, ScoreStrategy, Strategy

# Clip before log so that p = 0 contributes 0 * log(tiny) = 0 to the entropy.
_TINY = np.finfo(np.float64).tiny


@STRATEGIES.register("random")
class RandomSampling(Strategy):
    """Uniform sampling without replacement among the unlabelled samples.

    Deterministic for a given ``rng`` state; needs neither features nor a model.
    """

    name = "random"

    def _select_positions(self, pool: PoolView, n: int, rng: np.random.Generator) -> np.ndarray:
        candidates = pool.unlabeled_positions()
        return candidates[rng.choice(len(candidates), size=n, replace=False)]


@STRATEGIES.register("margin")
class MarginSampling(ScoreStrategy):
    """Smallest gap between the two most probable classes (the paper's main choice)."""

    name = "margin"

    def score(self, probs: np.ndarray) -> np.ndarray:
        """Minus the top-1 minus top-2 probability gap, float64 (m,)."""
        probs = np.asarray(probs)
        if probs.ndim != 2 or probs.shape[1] < 2:
            raise BadInputError(f"margin needs probabilities of at least 2 classes, got shape {probs.shape}")
        top2 = np.partition(probs, probs.shape[1] - 2, axis=1)[:, -2:].astype(np.float64)
        return top2[:, 0] - top2[:, 1]


@STRATEGIES.register("entropy")
class EntropySampling(ScoreStrategy):
    """Largest predictive entropy."""

    name = "entropy"

    def score(self, probs: np.ndarray) -> np.ndarray:
        """Entropy ``-sum p log p`` in nats, float64 (m,)."""
        p = np.asarray(probs, dtype=np.float64)
        return -(p * np.log(np.clip(p, _TINY, None))).sum(axis=1)


@STRATEGIES.register("least_confidence")
class LeastConfidenceSampling(ScoreStrategy):
    """Smallest probability of the most probable class."""

    name = "least_confidence"

    def score(self, probs: np.ndarray) -> np.ndarray:
        """``1 - max p``, float64 (m,)."""
        return 1.0 - np.asarray(probs).max(axis=1).astype(np.float64)
