"""Selection over a pool whose feature rows are sharded across Ray actors.

Each shard is a contiguous block of pool rows held by one actor (spread over the cluster's
nodes), together with whatever per-row state a strategy keeps for it: coreset's
minimum-distance slice, BADGE's gradient embeddings and D^2 weights. The driver only
broadcasts small things (a new centre, a sampling target) and reduces small answers (per-shard
maxima, per-shard weight totals, per-shard top-n), so the results equal the single-process
results: the local path runs the very same shard code on one in-process shard.

Public surface:

- :class:`ShardedStrategy` wraps a score-based strategy (margin, entropy, ...): shards score
  in parallel, each returns its top-n, the driver merges them into the global top-n.
- coreset and BADGE shard themselves (``STRATEGIES.create("coreset", execution="sharded")``).
- ``execution``: ``"local"``, ``"sharded"`` or ``"auto"`` (sharded when Ray is initialised
  and the pool has at least ``shard_min_rows`` rows).
"""
from __future__ import annotations

import hashlib
import os
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from asvp_ray.core.checks import check_int, is_int
from asvp_ray.core.errors import AsvpError, BadInputError, ConfigError
from asvp_ray.selection.base import PoolView, ScoreStrategy, Strategy, running_top_n, top_n

EXECUTIONS = ("auto", "local", "sharded")
#: ``execution="auto"`` shards pools at least this large (about 8 GB of 512-d float32 features).
DEFAULT_SHARD_MIN_ROWS = 4_000_000


# ---------------------------------------------------------------------------- configuration
@dataclass
class ExecutionOptions:
    """Where a strategy that can shard runs: one set of switches for every such strategy
    (coreset, BADGE, :class:`ShardedStrategy`).

    Args:
        execution: "local", "sharded" (Ray actors, one shard each) or "auto" (sharded when Ray
            is initialised and the pool has at least ``shard_min_rows`` rows).
        num_shards: shards when sharded; None means one per alive Ray node (at least 2).
        shard_min_rows: pool size from which "auto" shards.
        actor_options: Ray options of the shard actors (default ``{"num_cpus": 1}``).
    """

    execution: str = "auto"
    num_shards: Optional[int] = None
    shard_min_rows: int = DEFAULT_SHARD_MIN_ROWS
    actor_options: Optional[dict] = None

    def check(self, where: str) -> None:
        """Validate the switches.

        Raises:
            ConfigError: a switch is invalid; the message names the fix.
        """
        if self.execution not in EXECUTIONS:
            raise ConfigError(f"{where}: execution={self.execution!r} is not one of {', '.join(EXECUTIONS)}")
        if self.num_shards is not None and not is_int(self.num_shards):
            raise ConfigError(
                f"{where}: num_shards={self.num_shards!r} must be a positive integer or None (one per node)"
            )
        check_int(where, "shard_min_rows", self.shard_min_rows)
        if self.actor_options is not None and not isinstance(self.actor_options, dict):
            raise ConfigError(
                f"{where}: actor_options={self.actor_options!r} must be a dict of Ray actor options or None"
            )

    def resolve(self, n_rows: int) -> str:
        """``"local"`` or ``"sharded"`` for a pool of ``n_rows`` rows (see :func:`resolve_execution`)."""
        return resolve_execution(self.execution, n_rows, self.shard_min_rows)


def resolve_execution(execution: str, n_rows: int, shard_min_rows: int) -> str:
    """``"local"`` or ``"sharded"`` for a pool of ``n_rows`` rows.

    ``"auto"`` shards only when Ray is already initialised (it never starts a cluster by
    itself) and the pool has at least ``shard_min_rows`` rows.
    """
    if execution != "auto":
        return execution
    if n_rows < shard_min_rows:
        return "local"
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return "local"
    return "sharded" if ray.is_initialized() else "local"


def default_num_shards() -> int:
    """One shard per alive Ray node, at least two."""
    import ray

    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    return max(2, alive)


# ---------------------------------------------------------------------------- feature identity
class FeatureKey:
    """Identity of a feature matrix, for caches that live as long as one feature version.

    Memory maps match by file (path, offset, shape, dtype, size and mtime); in-memory arrays
    match only the very same array object (held by a weak reference). Both also compare a
    fingerprint of 64 sampled rows, so a buffer rewritten in place (a refresh written into
    the same array) is noticed too.
    """

    def __init__(self, features: np.ndarray):
        self._file = _memmap_identity(features)
        self._ref = None if self._file is not None else _weak(features)
        self._shape = tuple(features.shape)
        self._dtype = features.dtype.str
        self._fingerprint = row_fingerprint(features)

    def matches(self, features: Optional[np.ndarray]) -> bool:
        """True when ``features`` is the feature version this key was made from."""
        if features is None or tuple(features.shape) != self._shape or features.dtype.str != self._dtype:
            return False
        if self._file is not None:
            if _memmap_identity(features) != self._file:
                return False
        elif self._ref is None or self._ref() is not features:
            return False
        return row_fingerprint(features) == self._fingerprint


def _weak(obj):
    try:
        return weakref.ref(obj)
    except TypeError:  # pragma: no cover - numpy arrays support weak references
        return None


def _memmap_identity(features: np.ndarray):
    if isinstance(features, np.memmap) and getattr(features, "filename", None):
        try:
            st = os.stat(features.filename)
        except OSError:
            return None
        return (str(features.filename), int(features.offset), st.st_size, st.st_mtime_ns)
    return None


def row_fingerprint(features: np.ndarray) -> str:
    """A digest of 64 rows sampled evenly over ``features`` (a cheap identity of a feature matrix)."""
    n = len(features)
    h = hashlib.blake2b(digest_size=16)
    if n:
        rows = np.unique(np.linspace(0, n - 1, num=min(n, 64)).astype(np.int64))
        h.update(np.ascontiguousarray(features[rows]).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- shards
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
    :func:`asvp_ray.runtime.device.lean_memory_env` under the user's own ``env_vars`` (theirs win).
    Loading 500,000 x 512 rows (977 MB) in one process: peak 1,753 -> 1,453 MB above its start,
    1,207 -> 1,015 MB kept (Arrow's C++ reads otherwise allocate from mimalloc, which keeps)."""
    from asvp_ray.runtime.device import lean_memory_env

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


# ---------------------------------------------------------------------------- store-backed shards
def load_id_range(files: Sequence[str], lo: int, hi: int, batch_rows: int = 8192) -> Tuple[np.ndarray, np.ndarray]:
    """Rows with ``lo <= id <= hi`` of a feature version's Parquet parts, sorted by id.

    Two streamed passes over the parts (local paths or URIs through ``pyarrow.fs``), one batch
    in flight at a time: the id column first, to size the result, then the features, each row
    written straight to its sorted place. Parts (and row groups) whose id statistics lie outside
    ``[lo, hi]`` are skipped unread. The peak is the rows kept plus a few batches (the scanner
    reads ahead): batches of 8,192 rows (16 MB at 512 values), not 65,536 (134 MB each).
    """
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    from asvp_ray.storage.locations import is_uri, resolve_uri

    first = str(files[0])
    if is_uri(first):  # one filesystem object per process and bucket (query options kept)
        fs = resolve_uri(first)[0]
        paths = [resolve_uri(str(f))[1] for f in files]
    elif "://" in first:
        fs, _ = pafs.FileSystem.from_uri(first)
        paths = [pafs.FileSystem.from_uri(str(f))[1] for f in files]
    else:
        fs, paths = pafs.LocalFileSystem(), [str(f) for f in files]
    dataset = pads.dataset(paths, format="parquet", filesystem=fs)
    in_range = (pads.field("id") >= lo) & (pads.field("id") <= hi)
    scan = dict(batch_size=batch_rows, batch_readahead=1, fragment_readahead=1, filter=in_range)
    mine = []
    for batch in dataset.to_batches(columns=["id"], **scan):
        ids = batch.column(0).to_numpy()
        mine.append(ids[(ids >= lo) & (ids <= hi)].astype(np.int64))
    mine = np.sort(np.concatenate(mine)) if mine else np.zeros(0, np.int64)
    dim = dataset.schema.field("feature").type.list_size
    out = np.empty((len(mine), max(dim, 0)), dtype=np.float32)
    for batch in dataset.to_batches(columns=["id", "feature"], **scan):
        ids = batch.column(0).to_numpy()
        keep = np.flatnonzero((ids >= lo) & (ids <= hi))
        if not len(keep):
            continue
        feats = batch.column(1).flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        if len(keep) == len(ids):  # the whole batch: no gathered copy
            out[np.searchsorted(mine, ids)] = feats
        else:
            out[np.searchsorted(mine, ids[keep])] = feats[keep]
    return mine, out


def gather_rows(pieces: Sequence[Tuple[np.ndarray, Any]], n: int, get: Optional[Callable] = None,
                empty: Optional[np.ndarray] = None) -> np.ndarray:
    """One (n, ...) array from per-shard pieces (:meth:`StoreShards.rows_at_refs`: float32
    features), fetching one piece at a time (this process holds the result and one shard's reply,
    no more); ``empty`` (default a (0, 0) float32 array) when there is no piece."""
    if get is None:
        import ray

        get = ray.get
    from asvp_ray.runtime.device import unmap_shared_pages

    out = None
    for sel, ref in pieces:
        rows = np.asarray(get(ref))
        if out is None:
            out = np.empty((n,) + rows.shape[1:], dtype=rows.dtype)
        out[sel] = rows
        unmap_shared_pages(rows)  # copied out: the object store's pages need not stay in this RSS
        del rows
    if out is None:
        return empty if empty is not None else np.zeros((0, 0), np.float32)
    return out


def _compute_on_rows(pieces: Sequence[Sequence[Tuple[np.ndarray, Any]]], sizes: Sequence[int], threads: int,
                     fn: Callable, args: tuple):
    from asvp_ray.runtime.device import set_compute_threads

    set_compute_threads(threads)
    return fn(*[gather_rows(p, n) for p, n in zip(pieces, sizes)], *args)


def compute_on_rows(shards: "StoreShards", positions: Sequence[np.ndarray], fn: Callable, *args):
    """``fn(rows at positions[0], rows at positions[1], ..., *args)`` computed in a Ray task that
    fetches the rows from the shard actors, so neither the rows nor ``fn``'s working memory enter
    this process (the alignment monitor: PED's float64 copies of 20,000 x D rows are ~250 MB at
    D=256). The task reserves no CPU, as the driver does not, and computes on this process's
    thread count."""
    import ray
    import torch

    pieces = [shards.rows_at_refs(np.asarray(p, dtype=np.int64)) for p in positions]
    from asvp_ray.runtime.placement import cpu_options

    task = ray.remote(_compute_on_rows).options(num_cpus=0, **cpu_options())
    return ray.get(task.remote(pieces, [len(p) for p in positions], torch.get_num_threads(), fn, args))


def apply_at(features: np.ndarray, start: int, positions: np.ndarray, fn: Callable, *args):
    """``fn`` on a shard's rows at pool ``positions`` (all inside the shard)."""
    return fn(features[np.asarray(positions, dtype=np.int64) - start], *args)


def take_rows(features: np.ndarray, start: int, positions: np.ndarray) -> np.ndarray:
    """Rows of a shard at pool ``positions`` (all inside the shard)."""
    return np.asarray(features[np.asarray(positions, dtype=np.int64) - start])


class StoreShardHolder(ShardHolder):
    """A shard that loads its own rows, the ids ``[lo, hi]`` of a feature version, from the
    store's Parquet parts (local or URI): the pool never passes through the driver.

    Args:
        files: the version's pool parts.
        lo, hi: the first and last id of the shard (pool positions ``[start, start + expect)``).
        start: pool position of the first row.
        expect: rows the shard must find (a mismatch means the version changed under it).
    """

    def __init__(self, files: Sequence[str], lo: int, hi: int, start: int, expect: int):
        from asvp_ray.runtime.device import lean_arrow_memory

        lean_arrow_memory()
        ids, feats = load_id_range(files, int(lo), int(hi))
        if len(ids) != int(expect):
            raise AsvpError(f"shard of ids {lo}..{hi} found {len(ids)} rows in {files[0]}... but the version lists "
                            f"{expect}; the feature version changed while it was read")
        super().__init__(feats, start)
        self.first_id, self.last_id = int(lo), int(hi)


class StoreShards:
    """Row shards of one feature version, each loaded from the store by its own Ray actor.

    The driver passes each actor only the part file names and an id range; the actors read the
    rows themselves. Shards are contiguous in the pool's (sorted id) position order, like
    :class:`PoolShards`, so every sharded strategy runs on them unchanged.

    Args:
        files: the version's pool Parquet parts (paths or URIs).
        ids: the version's pool ids, sorted (the driver holds them: 8 bytes a row).
        num_shards: actors; None: one per alive node, at least 2.
        actor_options: Ray actor options (default ``{"num_cpus": 1}``, spread over the nodes).
        key: what identifies the version (for :meth:`matches`).
    """

    def __init__(self, files: Sequence[str], ids: np.ndarray, num_shards: Optional[int] = None,
                 actor_options: Optional[dict] = None, key: Any = None):
        self.key = key
        self.n_rows = len(ids)
        files = [str(f) for f in files]
        self.num_shards, self.group = start_shards(
            StoreShardHolder, self.n_rows, num_shards, actor_options,
            lambda s, e: (files, int(ids[s]), int(ids[e - 1]), s, e - s))

    def matches(self, features: Optional[np.ndarray], n_rows: int) -> bool:
        return n_rows == self.n_rows and bool(self.group.actors)

    def _per_shard(self, positions: np.ndarray, fn: Callable, *args) -> List[Tuple[np.ndarray, Any]]:
        """``(indices into positions, ObjectRef of fn(features, start, positions there, *args))``
        per shard that holds some of ``positions``; nothing is fetched."""
        positions = np.asarray(positions, dtype=np.int64)
        starts = np.array([s for s, _ in self.group.bounds])
        shard_of = np.searchsorted(starts, positions, side="right") - 1
        out = []
        for k in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == k)
            out.append((sel, self.group.actors[k].apply.remote(fn, positions[sel], *args)))
        return out

    def rows_at_refs(self, positions: np.ndarray) -> List[Tuple[np.ndarray, Any]]:
        """Where the rows at pool ``positions`` will be: ``(indices into positions, ObjectRef of
        those rows' float32 features)`` per shard that holds some. Nothing is fetched: another
        Ray task or actor can ``ray.get`` them, so the rows never pass through this process."""
        return self._per_shard(positions, take_rows)

    def rows_at(self, positions: np.ndarray) -> np.ndarray:
        """Features at pool ``positions`` (any order), fetched from the shards that hold them."""
        return gather_rows(self.rows_at_refs(positions), len(positions), self.group._get)

    def map_rows(self, positions: np.ndarray, fn: Callable, *args) -> np.ndarray:
        """``fn(features at positions, *args)`` computed on the shards that hold the rows (one
        result row per position, in ``positions``' order): the features stay in the shards."""
        return gather_rows(self._per_shard(positions, apply_at, fn, *args), len(positions), self.group._get,
                           empty=np.zeros(0))

    def close(self) -> None:
        """Kill the actors: their rows go with them."""
        self.group.close()


# ---------------------------------------------------------------------------- uncertainty
def shard_score_top_n(
    features: np.ndarray,
    start: int,
    ids: np.ndarray,
    mask: np.ndarray,
    probs: Optional[np.ndarray],
    model: Any,
    strategy: ScoreStrategy,
    n: int,
    chunk_size: int,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A shard's top-n, exactly as :class:`ScoreStrategy` keeps it.

    ``ids`` None: the pool's ids ascend with its positions, so the positions break ties in their
    place (the caller maps them back; the ids need not travel to the shard).

    Returns:
        ``(positions, scores, ids)``: pool positions (int64), float64 scores and ids (or positions,
        for ``ids`` None) of at most ``n`` rows of this shard, unordered.
    """
    if ids is None:
        ids = np.arange(start, start + len(mask), dtype=np.int64)
    feats = features if features.shape[1] else None
    view = PoolView(ids=ids, features=feats, labeled_mask=mask, model=model, probs=probs, chunk_size=chunk_size)
    pos, score, top_ids = running_top_n(view, strategy, n, row_offset=start)
    return pos + start, score, top_ids


def merge_top_n(parts: Sequence[Tuple[np.ndarray, np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """Global top-n positions from per-shard top-n's, most informative first (ties: lower id)."""
    pos = np.concatenate([p[0] for p in parts])
    score = np.concatenate([p[1] for p in parts])
    ids = np.concatenate([p[2] for p in parts])
    keep = top_n(score, ids, n)
    pos, score, ids = pos[keep], score[keep], ids[keep]
    return pos[np.lexsort((ids, -score))]


def top_n_over_shards(group: "ActorGroup", pool: PoolView, strategy: ScoreStrategy, n: int) -> np.ndarray:
    """The global top-n positions of a score strategy over shards that hold the pool's rows (or
    none, when ``pool.probs`` is given): each shard scores its rows and keeps its top-n, the
    driver merges them (most informative first, ties by lower id).

    Raises:
        BadInputError: neither probabilities nor a model to compute them.
    """
    if pool.probs is None and (pool.model is None or (pool.features is None and pool.shards is None)):
        raise BadInputError(
            "this strategy needs class probabilities: give PoolView.probs, or a fitted "
            "PoolView.model together with PoolView.features"
        )
    # sorted ids (a run's pool): positions stand in for them on the shards (8 bytes a row less to
    # send each round, and no object-store pages of them left in this process)
    by_position = pool.ids_ascending
    args = []
    for s, e in group.bounds:
        probs = pool.probs[s:e] if pool.probs is not None else None
        model = pool.model if pool.probs is None else None
        args.append((None if by_position else pool.ids[s:e], pool.labeled_mask[s:e], probs, model, strategy, n,
                     int(pool.chunk_size)))
    parts = group.apply_all(shard_score_top_n, args)
    if by_position:
        parts = [(p, score, np.asarray(pool.ids)[p]) for p, score, _ in parts]
    return merge_top_n(parts, n)


class ShardedExecution:
    """Mixin of the strategies that can shard: the :class:`ExecutionOptions` (``self.exec_options``)
    and the cached shard actors of the current feature version (``self._shards``)."""

    exec_options: ExecutionOptions
    _shards: Optional["PoolShards"] = None

    def _init_execution(self, execution, num_shards, shard_min_rows, actor_options) -> None:
        self.exec_options = ExecutionOptions(execution, num_shards, shard_min_rows, actor_options)
        self._shards = None

    # The switches read as attributes too (``strategy.execution``), as before.
    execution = property(lambda self: self.exec_options.execution)
    num_shards = property(lambda self: self.exec_options.num_shards)
    shard_min_rows = property(lambda self: self.exec_options.shard_min_rows)
    actor_options = property(lambda self: self.exec_options.actor_options)

    def _check_exec(self) -> None:
        self.exec_options.check(self.name)

    def _resolve(self, n_rows: int) -> str:
        return self.exec_options.resolve(n_rows)

    def _pool_resolve(self, pool: PoolView) -> str:
        """``"sharded"`` for a pool whose rows live in shard actors (``pool.shards``), else what
        the execution options choose for its size."""
        return "sharded" if pool.shards is not None else self._resolve(len(pool))

    def _pool_shards(self, pool: PoolView, features: Optional[np.ndarray]):
        """The pool's own store-loaded shards when it has them (the run owns them), else this
        strategy's shard actors holding ``features``."""
        if pool.shards is not None:
            return pool.shards
        return self._actor_shards(features, len(pool))

    def _actor_shards(self, features: Optional[np.ndarray], n_rows: int) -> "PoolShards":
        """The shard actors holding ``features``, (re)built when the feature version changed."""
        shards = self._shards
        if shards is None or not shards.matches(features, n_rows):
            if shards is not None:
                shards.close()
            self._shards = PoolShards(features, n_rows, self.num_shards, self.actor_options)
        return self._shards

    #: attributes holding caches (weak references, actor handles): dropped on copy and close.
    _CACHE_ATTRS: Tuple[str, ...] = ("_shards",)

    def close(self) -> None:
        """Release cached state and shard actors (they are rebuilt on the next select)."""
        if self._shards is not None:
            self._shards.close()
        for attr in self._CACHE_ATTRS:
            setattr(self, attr, None)

    def __getstate__(self):
        # Caches hold weak references and actor handles: a copy starts without them.
        state = dict(self.__dict__)
        for attr in self._CACHE_ATTRS:
            state[attr] = None
        return state


class ShardedStrategy(ShardedExecution, Strategy):
    """Runs a score-based strategy (margin, entropy, least_confidence) over sharded pools.

    Each shard scores its rows and keeps its own top-n; the driver merges them into the global
    top-n, which equals the single-process answer (same order, same tie-breaks).

    Args:
        strategy: a :class:`ScoreStrategy`, e.g. ``STRATEGIES.create("margin")``.
        execution: "local", "sharded" or "auto" (sharded when Ray is initialised and the pool
            has at least ``shard_min_rows`` rows).
        num_shards: shards (Ray actors); None means one per alive node, at least 2.
        shard_min_rows: the pool size from which "auto" shards.
        actor_options: Ray actor options for the shard actors (default ``{"num_cpus": 1}``).
    """

    def __init__(
        self,
        strategy: Strategy,
        execution: str = "auto",
        num_shards: Optional[int] = None,
        shard_min_rows: int = DEFAULT_SHARD_MIN_ROWS,
        actor_options: Optional[dict] = None,
    ):
        self.strategy = strategy
        self._init_execution(execution, num_shards, shard_min_rows, actor_options)

    @property
    def name(self) -> str:  # type: ignore[override]
        return getattr(self.strategy, "name", "strategy")

    def _select_positions(self, pool: PoolView, n: int, rng: np.random.Generator) -> np.ndarray:
        if not isinstance(self.strategy, ScoreStrategy):
            raise ConfigError(
                f"ShardedStrategy wraps score-based strategies (margin, entropy, least_confidence), "
                f"got {type(self.strategy).__name__}; coreset and badge shard themselves: "
                f"STRATEGIES.create('coreset', execution='sharded')"
            )
        self.exec_options.check("ShardedStrategy")
        if self._pool_resolve(pool) == "local":
            return self.strategy._select_positions(pool, n, rng)
        # Precomputed probabilities win over the model, so shards then need no features.
        feats = pool.features if pool.probs is None else None
        return top_n_over_shards(self._pool_shards(pool, feats).group, pool, self.strategy, n)

    def __repr__(self) -> str:
        return f"ShardedStrategy({self.strategy!r}, execution={self.execution!r}, num_shards={self.num_shards!r})"
