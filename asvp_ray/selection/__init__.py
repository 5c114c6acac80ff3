"""Query strategies behind a registry: ``STRATEGIES.create("margin").select(pool, n, rng)``."""
from asvp_ray.selection import uncertainty  # noqa: F401  (registers random, margin, entropy, least_confidence)
from asvp_ray.selection import coreset  # noqa: F401  (registers coreset)
from asvp_ray.selection import badge  # noqa: F401  (registers badge)
from asvp_ray.selection import typiclust  # noqa: F401  (registers typiclust)
from asvp_ray.selection import probcover  # noqa: F401  (registers probcover)
from asvp_ray.selection import cluster_margin  # noqa: F401  (registers cluster_margin)
from asvp_ray.selection import sharded  # noqa: F401  (ShardedStrategy: score strategies over Ray shards)
from asvp_ray.selection.base import STRATEGIES, ScoreStrategy, Strategy
from asvp_ray.selection.topn import running_top_n, top_n
from asvp_ray.selection.sharded import ExecutionOptions, ShardedStrategy
from asvp_ray.selection.options import build_strategy, strategy_options_help

__all__ = ["STRATEGIES", "build_strategy", "strategy_options_help", "ExecutionOptions", "ScoreStrategy", "ShardedStrategy", "Strategy", "running_top_n", "top_n"]
