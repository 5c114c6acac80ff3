"""The pool's data plane: what the package holds of the pool and where its rows live.

- :mod:`~asvp_ray.pool.view`: :class:`~asvp_ray.pool.view.PoolView`, the pool's data model (ids,
  features or the shards holding them, the labelled mask, model outputs), what strategies read.
- :mod:`~asvp_ray.pool.shards`: the pool's rows held by Ray actors (shard holders, in-process and
  actor groups, starting them), :class:`~asvp_ray.pool.shards.PoolShards` from an array.
- :mod:`~asvp_ray.pool.store_shards`: shard actors that load their id range of a feature version
  from the store (:class:`~asvp_ray.pool.store_shards.StoreShards`), fetching rows from them and
  computing where the rows are.
- :mod:`~asvp_ray.pool.identity`: the identity of a feature matrix, for per-version caches.

Selection strategies (:mod:`asvp_ray.selection`) read the pool through these; nothing here knows
a strategy.
"""
from asvp_ray.pool.view import PoolView

__all__ = ["PoolView"]
