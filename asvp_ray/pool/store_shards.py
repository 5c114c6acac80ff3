"""Shards that load their own rows from the feature store, and fetching rows or computing on them
where they live, so the pool never passes through the driver."""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from asvp_ray.core.errors import AsvpError
from asvp_ray.pool.shards import ShardHolder, start_shards


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
    from asvp_ray.runtime.allocator import unmap_shared_pages

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
        from asvp_ray.runtime.allocator import lean_arrow_memory

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
    :class:`~asvp_ray.pool.shards.PoolShards`, so every sharded strategy runs on them unchanged.

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
