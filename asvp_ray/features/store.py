"""The versioned feature store: ``features/v{k}/`` holds Parquet parts and ``meta.json``.

Layout of one version::

    features/v0/meta.json             backbone, weights source and hash, data config, source, rows
    features/v0/part-00000.parquet    pool rows: id (int64), feature (fixed_size_list<float32>[D])
    features/v0/test/part-00000.parquet   the test split, same columns (when there is one)

A version is written into a hidden ``.v{k}.partial-*`` folder and renamed into place only when
every file (and meta.json, last) is flushed to disk, so a crash never leaves a half version that
looks complete; leftovers are removed by the next writer. The parts are written either by the
driver (``VersionWriter.add``) or by the extraction's Ray workers straight into the partial
folder (``write_part``, then ``VersionWriter.add_part`` with what the worker reports); on a
cluster of several nodes the store's folder must then be on storage every node sees.

meta.json lists every part (``parts``: file, split, rows, bytes, sha256 of the file's bytes), so
a reader never uses a file the writer did not commit: a missing part, one of another size, or
one whose bytes no longer match its checksum is reported naming the file and the fix.
Versions written before the list existed are read by globbing ``part-*.parquet``, unchecked.

The store's root may also be a URI (``s3://bucket/prefix?endpoint_override=host:port&scheme=http``,
``gs://bucket/prefix``; the config's ``storage`` key), reached through ``pyarrow.fs``. An object
store has no atomic folder rename, so there a version commits manifest-last: the workers write
their parts straight under ``v{k}/`` (``write_part`` with the folder's URI), the writer removes
part files nobody reported and then writes ``v{k}/meta.json`` with one PUT. A version counts as
complete only when its meta.json exists; readers use only the parts it lists; a ``v{k}/`` prefix
without meta.json is a crash's leftover, removed by the next writer (``clean_partial``), and
``remove`` deletes meta.json first. Parts keep the workers' unique names there (no rename).

The two ways are the store's backends (:mod:`asvp_ray.features.backends`: ``LocalBackend``,
``ObjectStoreBackend``), chosen once from the root; :class:`FeatureStore` and
:class:`VersionWriter` hold what both share. The part format and the split writers are in
:mod:`asvp_ray.features.parts`, the shared feature cache in :mod:`asvp_ray.features.cache`.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import pyarrow as pa

from asvp_ray.core.errors import BadInputError, RunDirError
from asvp_ray.core.redact import redact_obj
from asvp_ray.features.backends import LocalBackend, ObjectStoreBackend
from asvp_ray.features.parts import POOL, SplitWriter, decode_into, sorted_rank
from asvp_ray.runtime.faults import fault_point
from asvp_ray.storage.atomic import json_default
from asvp_ray.storage.locations import is_uri


def _fill_cost(meta: Dict[str, Any]) -> None:
    """What the version cost to make, from its wall ``seconds`` and the ``cost.resources`` its
    writer held (meta.json → ``cost``: ``phase``, ``wall_s``, ``cpu_s``, ``gpu_s``, ``resources``,
    and for a refreshed version the ``finetune`` that made its weights)."""
    cost = meta.get("cost")
    if not isinstance(cost, dict) or "wall_s" in cost or meta.get("seconds") is None:
        return
    res = cost.get("resources") or {}
    wall = float(meta["seconds"])
    cost.update(wall_s=round(wall, 3), cpu_s=round(wall * float(res.get("cpus", 1.0)), 3),
                gpu_s=round(wall * float(res.get("gpus", 0.0)), 3))


def meta_bytes(meta: Dict[str, Any]) -> bytes:
    """meta.json's bytes: indented JSON, credentials in URIs it holds redacted."""
    return (json.dumps(redact_obj(meta), indent=2, default=json_default) + "\n").encode()


class VersionWriter:
    """Writes one feature version; use as a context manager. Nothing is visible until ``commit``.

    Where the parts go and how the version is committed is the store's backend's business: a
    local partial folder renamed into place, or parts straight under ``v{k}/`` on an object store
    with meta.json the commit (manifest-last).
    """

    def __init__(self, store: "FeatureStore", version: int, meta: Dict[str, Any]):
        self.store = store
        self.version = version
        self.meta = dict(meta)
        self.splits: Dict[str, SplitWriter] = {}
        self.committed = False
        self.staging = store.backend.begin(version)

    def _split(self, split: str) -> SplitWriter:
        if split not in self.splits:
            self.splits[split] = self.store.backend.split_writer(self.staging, self.version, split)
        return self.splits[split]

    def add(self, ids: np.ndarray, feats: np.ndarray, split: str = POOL) -> None:
        """Append rows of ``split`` (``pool`` or ``test``)."""
        self._split(split).add(ids, feats)
        self._count_batch()

    def folder(self, split: str = POOL) -> Union[Path, str]:
        """The (existing) folder workers write ``split``'s parts into (``write_part``); on an
        object store, its URI."""
        return self._split(split).folder

    def add_part(self, record: Dict[str, Any], split: str = POOL) -> None:
        """Register a part a worker wrote into :meth:`folder` (``write_part``'s record); it is
        checked (and in a local folder renamed ``part-NNNNN.parquet``) at :meth:`commit`."""
        self._split(split).add_part(record)
        self._count_batch()

    def _count_batch(self) -> None:
        self._batches = getattr(self, "_batches", 0) + 1
        fault_point(f"extract:v{self.version}:batch{self._batches}")

    def commit(self) -> Union[Path, str]:
        """Flush and check every part, then write meta.json last (with every part's size and
        sha256) and commit the version the backend's way.

        Raises:
            RunDirError: the version exists already, or a worker's part is missing.
        """
        for w in self.splits.values():
            w.close()
        meta = dict(self.meta)
        meta["version"] = self.version
        meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        meta["splits"] = {name: {"rows": w.rows, "dim": w.dim} for name, w in self.splits.items()}
        meta["parts"] = [{"file": p["file"] if name == POOL else f"{name}/{p['file']}", "split": name,
                          **{k: p[k] for k in ("rows", "bytes", "sha256")}}
                         for name, w in self.splits.items() for p in w.parts]
        meta["rows"] = meta["splits"].get(POOL, {}).get("rows", 0)
        meta["dim"] = meta["splits"].get(POOL, {}).get("dim")
        _fill_cost(meta)
        final = self.store.backend.commit(self.staging, self.version, meta_bytes(meta))
        self.committed = True
        return final

    def abort(self) -> None:
        for w in self.splits.values():
            w.abort()
        self.store.backend.abort(self.staging, self.version)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or not self.committed:
            self.abort()
        return False


class FeatureStore:
    """Versions of extracted features under ``root`` (a run's ``DIR/features``, or its folder on
    the configured ``storage``).

    Args:
        root: the store's folder (created on first write), or a URI (``s3://bucket/prefix``,
            ``gs://...``; query options such as ``?endpoint_override=host:port&scheme=http`` are
            kept and passed to every process that reads or writes it).
    """

    def __init__(self, root: Union[os.PathLike, str]):
        self.backend = ObjectStoreBackend(str(root)) if is_uri(root) else LocalBackend(root)
        self.root = self.backend.root
        self.remote = self.backend.remote

    # an object store's URI, its pyarrow filesystem and the root's path in it
    @property
    def uri(self) -> str:
        return self.backend.uri

    @property
    def fs(self):
        return self.backend.fs

    @property
    def fs_root(self) -> str:
        return self.backend.fs_root

    def path(self, version: int) -> Union[Path, str]:
        """The version's folder: a Path, or a URI string on an object store."""
        return self.backend.path(version)

    def location(self, version: int, name: str = "") -> str:
        """A file of the version for messages and records: a path, or a URI on an object store."""
        return self.backend.location(version, name)

    def versions(self) -> List[int]:
        """Complete versions (those with meta.json), ascending."""
        return self.backend.versions()

    def latest(self) -> Optional[int]:
        v = self.versions()
        return v[-1] if v else None

    def clean_partial(self) -> List[str]:
        """Remove half-written versions a crash left behind; returns their names."""
        return self.backend.clean_partial()

    def writer(self, version: int, meta: Dict[str, Any]) -> VersionWriter:
        self.backend.prepare_write(version)
        return VersionWriter(self, version, meta)

    def meta(self, version: int) -> Dict[str, Any]:
        meta = self.backend.read_meta(version)
        if meta is None:
            raise RunDirError(f"feature version v{version} is missing or incomplete in {self.root}; "
                              f"complete versions: {self.versions()}")
        return meta

    def _parts(self, version: int, split: str, check_size: bool = False) -> List[Tuple[Any, Optional[Dict]]]:
        """The split's parts (a path, or a path in the object store's filesystem) with their
        meta.json records (None for versions written before meta.json listed them); missing
        listed parts (and, with ``check_size``, parts of another size) raise."""
        return self.backend.parts(version, self.meta(version), split, check_size)

    def _damaged(self, version: int, path: Union[Path, str], what: str) -> None:
        self.backend.damaged(version, path, what)

    def _files(self, version: int, split: str) -> List[Any]:
        return [p for p, _ in self._parts(version, split)]

    def verify(self, version: int) -> None:
        """Check every part of ``version`` against meta.json: present, same size, same sha256.

        Raises:
            RunDirError: naming the first damaged part and the fix.
        """
        for split in self.meta(version).get("splits", {POOL: None}):
            for path, rec in self._parts(version, split, check_size=True):
                if rec is not None and self.backend.digest(path)["sha256"] != rec["sha256"]:
                    self._damaged(version, self.backend.where(version, rec, path),
                                  "does not match the sha256 meta.json lists")

    def read(self, version: int, split: str = POOL) -> Tuple[np.ndarray, np.ndarray]:
        """All rows of a split in memory, sorted by id; every part is checked against the size
        and sha256 meta.json lists while it is read.

        Returns:
            ids: int64 (N,), ascending; features: float32 (N, D), row i belongs to ids[i].

        Raises:
            BadInputError: NaN or infinite values (naming the ids).
            RunDirError: a part is missing, or its bytes are not those meta.json lists.
        """
        # Streamed: locally each part is hashed in 8 MiB chunks, on an object store fetched whole
        # (one GET, up to about PART_BYTES) and checked; then decoded a row group at a time into
        # one preallocated matrix. Decoding a whole fixed-size-list column at once takes about 5x
        # its bytes (a 20 MB test split: +114 MB in the driver).
        meta = self.meta(version)
        parts = self.backend.parts(version, meta, split, False)
        n, dim, sources, mismatched = self.backend.part_sources(version, meta, split, parts)
        ids = np.empty(n, dtype=np.int64)
        feats = np.empty((n, max(dim, 0)), dtype=np.float32)
        self._decode_parts(version, sources, ids, feats)
        self._check_finite(version, split, ids, feats)
        if mismatched:
            self._damaged(version, mismatched[0], "does not match the size and sha256 meta.json lists")
        return ids, feats

    def _decode_parts(self, version: int, sources, ids: np.ndarray, feats: np.ndarray) -> None:
        """Fill the preallocated ``ids`` / ``feats`` from the parts (``sources``: (where, open)
        pairs, ``open()`` giving the part's ParquetFile), sorted by id. Parts listed in id order
        holding ascending ids (what the writers make) take one pass; otherwise the ids are
        sorted and a second pass decodes the features again, each row into its sorted place:
        the matrix is never held twice."""
        rank = None
        for second in (False, True):
            at = 0
            for where, open_part in sources:
                f = open_part()
                try:
                    at = decode_into(f, None if second else ids, feats, at, rank)
                except (pa.ArrowException, OSError, ValueError) as e:
                    self._damaged(version, where, f"cannot be read as Parquet ({type(e).__name__}: {e})")
            if second:
                return
            rank = sorted_rank(ids)
            if rank is None:
                return

    def _check_finite(self, version: int, split: str, ids: np.ndarray, feats: np.ndarray,
                      chunk: int = 65_536) -> None:
        bad: List[int] = []  # checked in row blocks: np.isfinite of the whole matrix is a quarter of its bytes
        for s in range(0, len(feats), chunk):
            finite = np.isfinite(feats[s:s + chunk]).all(axis=1)
            if not finite.all():
                bad += ids[s:s + chunk][~finite][:10 - len(bad)].tolist()
                if len(bad) >= 10:
                    break
        if bad:
            raise BadInputError(f"feature version v{version} ({split}) in {self.path(version)} holds NaN or infinite "
                                f"values for ids {bad}; the files are damaged: delete "
                                f"{self.path(version)} and rerun to extract it again")

    def read_ids(self, version: int, split: str = POOL) -> np.ndarray:
        """The split's ids only (int64, sorted): 8 bytes a row, no feature is read. A part that
        cannot be read is checked against meta.json's size and sha256 to say what is wrong."""
        cols = []
        for path, rec in self._parts(version, split):
            try:
                cols.append(self.backend.read_id_column(path))
            except (pa.ArrowException, OSError) as e:
                self.verify(version)
                self._damaged(version, self.backend.where(version, rec, path),
                              f"cannot be read as Parquet ({type(e).__name__}: {e})")
        ids = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        return np.sort(ids.astype(np.int64, copy=False), kind="stable")

    def part_files(self, version: int, split: str = POOL) -> List[Union[Path, str]]:
        """The split's Parquet parts (for readers in other processes: shard actors), each checked
        to exist with the size meta.json lists; on an object store, their URIs."""
        return [self.backend.where(version, rec, p) for p, rec in self._parts(version, split, check_size=True)]

    def lookup(self, version: int, ids: np.ndarray, split: str = POOL) -> np.ndarray:
        """Features of the given ids, in the given order (float32 (len(ids), D))."""
        all_ids, feats = self.read(version, split)
        pos = np.searchsorted(all_ids, ids)
        ok = (pos < len(all_ids)) & (all_ids[np.minimum(pos, len(all_ids) - 1)] == ids)
        if not ok.all():
            raise BadInputError(f"ids not in feature version v{version}: {np.asarray(ids)[~ok][:10].tolist()}")
        return feats[pos]

    def to_dataset(self, version: int, split: str = POOL):
        """The split as a Ray Dataset (streamed from Parquet; columns id, feature)."""
        self.meta(version)
        return self.backend.dataset(self._files(version, split))

    def remove(self, version: int) -> None:
        """Delete a version (on an object store meta.json first: a crash midway leaves an
        incomplete version, never a damaged one)."""
        self.backend.remove(version)
