"""The pool's rows held by Ray actors: shards, their groups, and starting them.

Each shard is a contiguous block of pool rows held by one actor (spread over the cluster's
nodes), together with whatever per-row state a caller keeps for it (a strategy's coreset
minimum-distance slice, BADGE's gradient embeddings). The caller broadcasts small things and
reduces small answers; :class:`LocalGroup` runs the very same shard code in-process, so local
and sharded results are equal.

- :class:`ShardHolder`: one shard (in-process, or the class of a Ray actor).
- :class:`LocalGroup` / :class:`ActorGroup`: the same calls over in-process shards or actors.
- :func:`start_shards`: one actor per row range, spread over the nodes, waited for.
- :class:`PoolShards`: shards of a feature matrix this process holds (sent once per version).
  Store-loaded shards are :class:`asvp_ray.pool.store_shards.StoreShards`.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from asvp_ray.core.errors import AsvpError, ConfigError
from asvp_ray.pool.identity import FeatureKey


def default_num_shards() -> int:
    """One shard per alive Ray node, at least two."""
    import ray

    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    return max(2, alive)


class ShardHolder:
    """One contiguous row block of the pool's features plus named per-shard state objects.

    Used in-process for local selection and as a Ray actor for sharded selection, so both
    paths run the same code.

    Args:
        features: (m, D) rows ``[start, start + m)`` of the pool's features.
        start: pool position of the first row.
        copy: copy ``features`` into this process's memory (actors: so the object store copy
            can be released).
    """

    def __init__(self, features: np.ndarray, start: int, copy: bool = False):
        self.features = np.array(features, copy=True) if copy else features
        self.start = int(start)
        self._objs: Dict[str, Any] = {}

    def ready(self) -> int:
        """Rows held (a cheap call to wait for an actor's start)."""
        return len(self.features)

    def node_id(self) -> Optional[str]:
        """The Ray node this holder runs on (None outside Ray)."""
        try:
            import ray

            return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        except Exception:  # pragma: no cover - no runtime context
            return None

    def build(self, name: str, factory: Callable, *args) -> bool:
        """Create the state object ``name`` as ``factory(features, start, *args)``."""
        self._objs[name] = factory(self.features, self.start, *args)
        return True

    def has(self, name: str) -> bool:
        return name in self._objs

    def drop(self, name: str) -> bool:
        return self._objs.pop(name, None) is not None

    def call(self, name: str, method: str, *args):
        """Call ``method`` of the state object ``name``."""
        return getattr(self._objs[name], method)(*args)

    def apply(self, fn: Callable, *args):
        """Stateless: ``fn(features, start, *args)``."""
        return fn(self.features, self.start, *args)


class LocalGroup:
    """In-process shards (usually one covering the whole pool)."""

    def __init__(self, holders: Sequence[ShardHolder]):
        self.holders = list(holders)
        self.bounds = [(h.start, h.start + len(h.features)) for h in self.holders]

    def __len__(self) -> int:
        return len(self.holders)

    def build(self, name: str, factory: Callable, args_per_shard: Sequence[tuple]) -> None:
        for h, args in zip(self.holders, args_per_shard):
            h.build(name, factory, *args)

    def has(self, name: str) -> List[bool]:
        return [h.has(name) for h in self.holders]

    def call_all(self, name: str, method: str, args_per_shard: Optional[Sequence[tuple]] = None, common: tuple = ()) -> list:
        if args_per_shard is None:
            args_per_shard = [common] * len(self.holders)
        return [h.call(name, method, *args) for h, args in zip(self.holders, args_per_shard)]

    def call_one(self, i: int, name: str, method: str, *args):
        return self.holders[i].call(name, method, *args)

    def apply_all(self, fn: Callable, args_per_shard: Sequence[tuple]) -> list:
        return [h.apply(fn, *args) for h, args in zip(self.holders, args_per_shard)]

    def drop(self, name: str) -> None:
        for h in self.holders:
            h.drop(name)

    def close(self) -> None:
        self.holders = []


class ActorGroup:
    """Shards held by Ray actors; same calls as :class:`LocalGroup`, run in parallel."""

    def __init__(self, actors: Sequence[Any], bounds: Sequence[Tuple[int, int]]):
        self.actors = list(actors)
        self.bounds = list(bounds)

    def __len__(self) -> int:
        return len(self.actors)

    @staticmethod
    def _get(refs):
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            # Surface asvp errors raised inside an actor as themselves.
            cause = getattr(exc, "cause", None)
            if isinstance(cause, AsvpError):
                raise cause from None
            raise

    def build(self, name: str, factory: Callable, args_per_shard: Sequence[tuple]) -> None:
        self._get([a.build.remote(name, factory, *args) for a, args in zip(self.actors, args_per_shard)])

    def has(self, name: str) -> List[bool]:
        return self._get([a.has.remote(name) for a in self.actors])

    def call_all(self, name: str, method: str, args_per_shard: Optional[Sequence[tuple]] = None, common: tuple = ()) -> list:
        if args_per_shard is None:
            args_per_shard = [common] * len(self.actors)
        return self._get([a.call.remote(name, method, *args) for a, args in zip(self.actors, args_per_shard)])

    def call_one(self, i: int, name: str, method: str, *args):
        return self._get(self.actors[i].call.remote(name, method, *args))

    def apply_all(self, fn: Callable, args_per_shard: Sequence[tuple]) -> list:
        return self._get([a.apply.remote(fn, *args) for a, args in zip(self.actors, args_per_shard)])

    def drop(self, name: str) -> None:
        self._get([a.drop.remote(name) for a in self.actors])

    def node_ids(self) -> List[Optional[str]]:
        """The Ray node of each shard."""
        return self._get([a.node_id.remote() for a in self.actors])

    def close(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # pragma: no cover - the actor or the cluster is already gone
                pass
        self.actors = []


def wait_for_shards(group: "ActorGroup", opts: dict) -> None:
    """Wait until every shard actor has started (``$ASVP_SHARD_START_TIMEOUT`` seconds, default
    300); actors that cannot be placed raise an error naming what they ask for instead of
    waiting forever (the autoscaler has that long to add a node).

    Raises:
        ConfigError: the shards did not start; the actors are stopped.
    """
    import ray

    timeout = float(os.environ.get("ASVP_SHARD_START_TIMEOUT", "300"))
    refs = [a.ready.remote() for a in group.actors]
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if pending:
        group.close()
        avail = ray.available_resources()
        asked = {"CPU": opts.get("num_cpus", 1), "GPU": opts.get("num_gpus", 0), **(opts.get("resources") or {})}
        free = ", ".join(f"{avail.get(k, 0):g} {k}" for k, v in asked.items() if v)
        raise ConfigError(
            f"{len(pending)} of {len(refs)} selection shard actors did not start within {timeout:g}s: each asks for "
            f"{ {k: v for k, v in opts.items() if k != 'scheduling_strategy'} } and the cluster has "
            f"{free or 'what they ask'} free now; use fewer shards (pool_shards.num_shards, or the strategy's "
            "num_shards) or fewer CPUs each (pool_shards.num_cpus / actor_options), or add nodes")
    group._get(ready)


def shard_bounds(n_rows: int, num_shards: int) -> List[Tuple[int, int]]:
    """Contiguous, nearly equal row ranges, in position order (never empty)."""
    num_shards = max(1, min(int(num_shards), max(n_rows, 1)))
    edges = np.linspace(0, n_rows, num_shards + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _with_lean_memory(runtime_env: Optional[dict]) -> dict:
    """A shard actor's ``runtime_env`` with the allocator settings of
    :func:`asvp_ray.runtime.allocator.lean_memory_env` under the user's own ``env_vars`` (theirs win).
    Loading 500,000 x 512 rows (977 MB) in one process: peak 1,753 -> 1,453 MB above its start,
    1,207 -> 1,015 MB kept (Arrow's C++ reads otherwise allocate from mimalloc, which keeps)."""
    from asvp_ray.runtime.allocator import lean_memory_env

    env = dict(runtime_env or {})
    env["env_vars"] = {**lean_memory_env(), **(env.get("env_vars") or {})}
    return env


def start_shards(holder_cls, n_rows: int, num_shards: Optional[int], actor_options: Optional[dict],
                 holder_args: Callable[[int, int], tuple]) -> Tuple[int, "ActorGroup"]:
    """Start one ``holder_cls`` actor per row range of a pool of ``n_rows`` rows and wait for them.

    Args:
        holder_cls: a :class:`ShardHolder` class.
        num_shards: actors; None: one per alive node, at least 2.
        actor_options: Ray actor options over the default ``{"num_cpus": 1}``, spread over the nodes
            (a ``runtime_env`` of theirs gets the allocator settings added to its ``env_vars``).
        holder_args: ``(start, end) -> constructor arguments`` of the shard of rows ``[start, end)``.

    Returns:
        (the number of shards, their :class:`ActorGroup`).
    """
    import ray

    from asvp_ray.runtime.ray_utils import init_ray

    init_ray()
    num_shards = int(num_shards or default_num_shards())
    from asvp_ray.runtime.placement import cpu_options

    opts = {"num_cpus": 1, "scheduling_strategy": "SPREAD", **cpu_options()}  # off GPU nodes
    opts.update(actor_options or {})
    opts["runtime_env"] = _with_lean_memory(opts.get("runtime_env"))
    remote_cls = ray.remote(holder_cls)
    bounds = shard_bounds(n_rows, num_shards)
    group = ActorGroup([remote_cls.options(**opts).remote(*holder_args(s, e)) for s, e in bounds], bounds)
    wait_for_shards(group, opts)
    return num_shards, group


class PoolShards:
    """Row shards of one feature version, each held by a Ray actor, spread over the nodes.

    The data travels once per feature version; strategies keep their per-shard state in the
    actors between rounds.

    Args:
        features: (N, D) pool features; None gives shards without features (probabilities
            are then sent with each call).
        n_rows: N (needed when ``features`` is None).
        num_shards: number of actors; None means one per alive node (at least 2).
        actor_options: Ray actor options; default ``{"num_cpus": 1}``, scheduled "SPREAD".
    """

    def __init__(
        self,
        features: Optional[np.ndarray],
        n_rows: int,
        num_shards: Optional[int] = None,
        actor_options: Optional[dict] = None,
    ):
        import ray

        self.key = FeatureKey(features) if features is not None else None
        self.n_rows = int(n_rows)

        def holder_args(s: int, e: int) -> tuple:
            block = features[s:e] if features is not None else np.empty((e - s, 0), np.float32)
            return ray.put(np.ascontiguousarray(block)), s, True

        self.num_shards, self.group = start_shards(ShardHolder, self.n_rows, num_shards, actor_options, holder_args)

    def matches(self, features: Optional[np.ndarray], n_rows: int) -> bool:
        """True when these shards hold ``features`` (same version) for a pool of ``n_rows`` rows."""
        if n_rows != self.n_rows or not self.group.actors:
            return False
        if self.key is None:
            return features is None
        return self.key.matches(features)

    def close(self) -> None:
        """Kill the actors (their state and data go with them)."""
        self.group.close()
