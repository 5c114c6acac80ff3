"""Query strategies behind a registry: ``STRATEGIES.create("margin").select(pool, n, rng)``."""
from asvp_ray.selection import uncertainty  # noqa: F401  (registers random, margin, entropy, least_confidence)
from asvp_ray.selection import diversity  # noqa: F401  (registers coreset, badge)
from asvp_ray.selection import clustering  # noqa: F401  (registers typiclust, probcover)
from asvp_ray.selection import sharded  # noqa: F401  (ShardedStrategy: score strategies over Ray shards)
from asvp_ray.selection.base import STRATEGIES, PoolView, ScoreStrategy, Strategy, top_n

__all__ = ["STRATEGIES", "PoolView", "ScoreStrategy", "Strategy", "top_n"]
