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
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from asvp_ray.runtime.faults import fault_point
from asvp_ray.core.errors import BadInputError, RunDirError
from asvp_ray.core.redact import redact_obj
from asvp_ray.storage.atomic import atomic_write_bytes, atomic_write_json, file_digest, fs_digest, fsync_dir, json_default
from asvp_ray.storage.locations import (child_folders, delete_prefix, is_uri, join_uri, local_path, put_bytes, read_bytes,
                                        resolve_uri)

ROWS_PER_FILE = 262_144
ROW_GROUP_ROWS = 4096
# Parts the extraction workers write: about PART_BYTES of features each, within these row bounds.
PART_BYTES = 32 << 20
MIN_ROWS_PER_PART, MAX_ROWS_PER_PART = 1024, 16_384
_VERSION_RE = re.compile(r"^v(\d+)$")
POOL = "pool"


def features_to_arrow(ids: np.ndarray, feats: np.ndarray) -> pa.Table:
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    values = pa.array(feats.reshape(-1), pa.float32())
    col = pa.FixedSizeListArray.from_arrays(values, feats.shape[1])
    return pa.table({"id": pa.array(np.asarray(ids, dtype=np.int64), pa.int64()), "feature": col})


def arrow_to_features(table: pa.Table) -> Tuple[np.ndarray, np.ndarray]:
    ids = table.column("id").to_numpy().astype(np.int64, copy=False)
    col = table.column("feature").combine_chunks()
    if isinstance(col, pa.ChunkedArray):  # pragma: no cover - combine_chunks on a column returns an array
        col = col.chunk(0)
    dim = col.type.list_size
    values = col.flatten().to_numpy(zero_copy_only=False)
    return ids, values.reshape(-1, dim).astype(np.float32, copy=False)


def check_finite(ids: np.ndarray, feats: np.ndarray) -> None:
    """Raises BadInputError naming the ids whose features hold NaN or infinity."""
    finite = np.isfinite(feats).all(axis=1)
    if not finite.all():
        raise BadInputError(f"features of ids {np.asarray(ids)[~finite][:10].tolist()} contain NaN or infinity; check "
                            "the backbone weights and the images (or disable AMP)")


def rows_per_part(dim: int) -> int:
    """Rows of a worker-written part: about ``PART_BYTES`` of float32 features."""
    return int(min(MAX_ROWS_PER_PART, max(MIN_ROWS_PER_PART, PART_BYTES // (4 * max(int(dim), 1)))))


def write_part(folder: os.PathLike, ids: np.ndarray, feats: np.ndarray) -> Dict[str, Any]:
    """Write one Parquet part of a version being written (run by extraction workers).

    The file gets a unique name (``part-w<random>.parquet``; a retried task writes another, and
    the commit removes the one nobody reported) and is flushed to disk before this returns.

    Args:
        folder: the split's folder inside the version's partial folder (it must exist), or its
            URI on an object store (``VersionWriter.folder``): the object is written whole, in one
            upload, straight from this worker. An object store has no folder to be gone, so a task
            still writing after its version was aborted leaves an object no meta.json lists (never
            read): the next writer removes it with the incomplete prefix (``clean_partial``), or
            the commit does if it is there by then; one landing after a commit stays, unread, until
            that version is removed.
        ids: int64 (N,); feats: float32 (N, D), N > 0.

    Returns:
        the part's record for ``VersionWriter.add_part``: file, rows, dim, bytes, sha256, min_id.

    Raises:
        BadInputError: NaN or infinite features, naming their ids.
    """
    check_finite(ids, feats)
    sink = pa.BufferOutputStream()
    # small row groups: readers decode one at a time (a whole 32 MB fixed-size-list column at once
    # takes about 5x its bytes)
    pq.write_table(features_to_arrow(ids, feats), sink, row_group_size=ROW_GROUP_ROWS)
    data = sink.getvalue()
    name = f"part-w{uuid.uuid4().hex[:16]}.parquet"
    if is_uri(folder):
        fs, base = resolve_uri(str(folder))
        put_bytes(fs, f"{base}/{name}", data)
    else:
        path = Path(folder) / name
        with open(path, "xb") as f:  # never a fresh folder: an aborted version's folder stays gone
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return {"file": name, "rows": int(len(ids)), "dim": int(feats.shape[1]), "bytes": int(data.size),
            "sha256": hashlib.sha256(memoryview(data)).hexdigest(), "min_id": int(np.min(ids))}


class _SplitWriter:
    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.writer: Optional[pq.ParquetWriter] = None
        self.part = 0
        self.rows_in_part = 0
        self.rows = 0
        self.dim: Optional[int] = None
        self.ids: List[np.ndarray] = []
        self.parts: List[Dict[str, Any]] = []  # closed parts: file (name), rows, bytes, sha256

    def add(self, ids: np.ndarray, feats: np.ndarray) -> None:
        if len(ids) == 0:
            return
        check_finite(ids, feats)
        if self.dim is None:
            self.dim = int(feats.shape[1])
        table = features_to_arrow(ids, feats)
        if self.writer is None or self.rows_in_part >= ROWS_PER_FILE:
            self._close_part()
            self.writer = pq.ParquetWriter(self.folder / f"part-{self.part:05d}.parquet", table.schema)
            self.part += 1
            self.rows_in_part = 0
        self.writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.rows_in_part += len(ids)
        self.rows += len(ids)
        self.ids.append(np.asarray(ids, dtype=np.int64))

    def _close_part(self):
        if self.writer is not None:
            self.writer.close()
            path = self.folder / f"part-{self.part - 1:05d}.parquet"
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            self.parts.append({"file": path.name, "rows": self.rows_in_part, **file_digest(path)})
            self.writer = None

    def add_part(self, record: Dict[str, Any]) -> None:
        """Take over a part a worker wrote into this folder (``write_part``'s record)."""
        if self.dim is not None and int(record["dim"]) != self.dim:
            raise BadInputError(f"part {record['file']} holds {record['dim']}-value features, others {self.dim}")
        self.dim = int(record["dim"])
        self.parts.append({k: record[k] for k in ("file", "rows", "bytes", "sha256", "min_id")})
        self.rows += int(record["rows"])

    def finish_worker_parts(self) -> None:
        """Check the workers' parts, remove files no record names (a retried write task's first
        try), and rename the parts ``part-NNNNN.parquet`` in the order of their smallest id."""
        listed = {p["file"] for p in self.parts}
        for f in self.folder.glob("part-w*.parquet"):
            if f.name not in listed:
                f.unlink()
        own = [p for p in self.parts if "min_id" not in p]
        theirs = sorted((p for p in self.parts if "min_id" in p), key=lambda p: p["min_id"])
        for k, p in enumerate(theirs, start=len(own)):
            src = self.folder / p["file"]
            p.pop("min_id")
            size = src.stat().st_size if src.is_file() else None
            if size != p["bytes"]:
                raise RunDirError(f"part {src} written by an extraction worker is {'missing' if size is None else f'{size} bytes'}"
                                  f", its worker reported {p['bytes']}; rerun the extraction")
            name = f"part-{k:05d}.parquet"
            os.rename(src, self.folder / name)
            p["file"] = name
        self.parts = own + theirs

    def close(self) -> None:
        self._close_part()
        self.finish_worker_parts()
        if self.ids:
            all_ids = np.concatenate(self.ids)
            if len(np.unique(all_ids)) != len(all_ids):
                u, c = np.unique(all_ids, return_counts=True)
                raise BadInputError(f"duplicate ids written to the feature store: {u[c > 1][:10].tolist()}")
        fsync_dir(self.folder)


class _ObjectSplitWriter(_SplitWriter):
    """One split of a version on an object store: every part is written whole under the version's
    prefix (by workers through ``write_part``, or by :meth:`add`, one part per call); nothing is
    renamed, and parts nobody reported are deleted before meta.json is written."""

    def __init__(self, store: "FeatureStore", version: int, split: str):
        sub = () if split == POOL else (split,)
        self.folder = join_uri(store.path(version), *sub)  # the URI workers write to
        self.fs, self.fs_folder = store.fs, "/".join((store._fs_path(version),) + sub)
        self.writer = None
        self.rows = 0
        self.dim: Optional[int] = None
        self.ids: List[np.ndarray] = []
        self.parts: List[Dict[str, Any]] = []

    def add(self, ids: np.ndarray, feats: np.ndarray) -> None:
        if len(ids) == 0:
            return
        self.add_part(write_part(self.folder, ids, np.asarray(feats, dtype=np.float32)))
        self.ids.append(np.asarray(ids, dtype=np.int64))

    def _close_part(self):
        pass

    def finish_worker_parts(self) -> None:
        infos = self.fs.get_file_info(pafs.FileSelector(self.fs_folder, allow_not_found=True))
        present = {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}
        listed = {p["file"] for p in self.parts}
        for name in present:
            if name.startswith("part-w") and name not in listed:  # a retried write task's first try
                self.fs.delete_file(f"{self.fs_folder}/{name}")
        self.parts.sort(key=lambda p: p["min_id"])
        for p in self.parts:
            p.pop("min_id", None)
            size = present.get(p["file"])
            if size != p["bytes"]:
                raise RunDirError(f"part {join_uri(self.folder, p['file'])} written by an extraction worker is "
                                  f"{'missing' if size is None else f'{size} bytes'}, its worker reported "
                                  f"{p['bytes']}; rerun the extraction")

    def close(self) -> None:
        self.finish_worker_parts()
        if self.ids:
            all_ids = np.concatenate(self.ids)
            if len(np.unique(all_ids)) != len(all_ids):
                u, c = np.unique(all_ids, return_counts=True)
                raise BadInputError(f"duplicate ids written to the feature store: {u[c > 1][:10].tolist()}")


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


class VersionWriter:
    """Writes one feature version; use as a context manager. Nothing is visible until ``commit``."""

    def __init__(self, store: "FeatureStore", version: int, meta: Dict[str, Any]):
        self.store = store
        self.version = version
        self.meta = dict(meta)
        self.splits: Dict[str, _SplitWriter] = {}
        self.committed = False
        if store.remote:  # manifest-last: parts go straight under v{k}/, meta.json is the commit
            self.tmp = None
            return
        self.tmp = store.root / f".v{version}.partial-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir(parents=True)

    def _split(self, split: str) -> _SplitWriter:
        if split not in self.splits:
            if self.store.remote:
                self.splits[split] = _ObjectSplitWriter(self.store, self.version, split)
            else:
                self.splits[split] = _SplitWriter(self.tmp if split == POOL else self.tmp / split)
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
        checked and renamed ``part-NNNNN.parquet`` at :meth:`commit`."""
        self._split(split).add_part(record)
        self._count_batch()

    def _count_batch(self) -> None:
        self._batches = getattr(self, "_batches", 0) + 1
        fault_point(f"extract:v{self.version}:batch{self._batches}")

    def commit(self) -> Path:
        """Flush everything, write meta.json last (with every part's size and sha256), and rename
        the folder into place."""
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
        if self.store.remote:
            return self._commit_object_store(meta)
        atomic_write_json(self.tmp / "meta.json", meta)
        final = self.store.path(self.version)
        if final.exists():
            raise RunDirError(f"feature version {final} already exists; remove it or write v{self.version + 1}")
        os.rename(self.tmp, final)
        fsync_dir(self.store.root)
        self.committed = True
        return final

    def _commit_object_store(self, meta: Dict[str, Any]) -> str:
        """Every listed part is checked to be there with its size (``close``); meta.json is then
        written with one PUT: the version exists from that moment, whole."""
        store = self.store
        if store.fs.get_file_info(store._fs_path(self.version, "meta.json")).type == pafs.FileType.File:
            raise RunDirError(f"feature version {store.path(self.version)} already exists; remove it or write "
                              f"v{self.version + 1}")
        fault_point(f"commit:v{self.version}")
        put_bytes(store.fs, store._fs_path(self.version, "meta.json"),
             (json.dumps(redact_obj(meta), indent=2, default=json_default) + "\n").encode())
        self.committed = True
        return store.path(self.version)

    def abort(self) -> None:
        if self.store.remote:  # no meta.json was written: the prefix is a leftover, never read
            try:
                self.store._delete_incomplete(self.version)
            except OSError:  # the next writer removes it (clean_partial)
                pass
            return
        for w in self.splits.values():
            if w.writer is not None:
                w.writer.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or not self.committed:
            self.abort()
        return False


def _open_part(source) -> "pq.ParquetFile":
    """A part for decoding: no pre-buffering. ``pq.ParquetFile`` pre-buffers by default, i.e. reads
    the whole file's column chunks into memory before the first batch and keeps them while the
    file is open: with every part of a version open at once, a second copy of the pool (a
    200,000 x 256 version's read peaked at 2.5x its matrix, 1.4x without pre-buffering)."""
    return pq.ParquetFile(source, pre_buffer=False)


def _decode_into(f: "pq.ParquetFile", ids: Optional[np.ndarray], feats: np.ndarray, at: int,
                 rank: Optional[np.ndarray] = None) -> int:
    """Decode a part a row group at a time into ``ids`` / ``feats`` from row ``at`` (file order);
    returns the next row. With ``rank`` (file row -> sorted row) each feature row goes straight to
    its sorted place and ``ids`` may be None (only the features are decoded). Decoding a whole
    fixed-size-list column at once takes about 5x its bytes."""
    dim = feats.shape[1]
    columns = ["feature"] if ids is None else ["id", "feature"]
    for batch in f.iter_batches(batch_size=ROW_GROUP_ROWS, columns=columns, use_threads=False):
        m = batch.num_rows
        if ids is not None:
            ids[at:at + m] = batch.column("id").to_numpy()
        rows = batch.column("feature").flatten().to_numpy(zero_copy_only=False).reshape(m, dim)
        if rank is None:
            feats[at:at + m] = rows
        else:
            feats[rank[at:at + m]] = rows
        at += m
    return at


def _sorted_rank(ids: np.ndarray) -> Optional[np.ndarray]:
    """None when ``ids`` ascend; else sorts ``ids`` in place (stable) and returns each file row's
    sorted position, for a second decoding pass that puts every feature row in its place (the
    feature matrix is never copied to sort it: a few int64 arrays of the pool's length here)."""
    if len(ids) < 2 or bool(np.all(ids[:-1] <= ids[1:])):
        return None
    order = np.argsort(ids, kind="stable")
    rank = np.empty(len(ids), dtype=np.int64)
    rank[order] = np.arange(len(ids), dtype=np.int64)
    ids[:] = ids[order]
    return rank


class FeatureStore:
    """Versions of extracted features under ``root`` (a run's ``DIR/features``, or its folder on
    the configured ``storage``).

    Args:
        root: the store's folder (created on first write), or a URI (``s3://bucket/prefix``,
            ``gs://...``; query options such as ``?endpoint_override=host:port&scheme=http`` are
            kept and passed to every process that reads or writes it).
    """

    def __init__(self, root: Union[os.PathLike, str]):
        self.remote = is_uri(root)
        if self.remote:
            self.uri = join_uri(str(root))
            self.root = self.uri
            self.fs, self.fs_root = resolve_uri(self.uri)
        else:
            self.root = local_path(root)

    def path(self, version: int) -> Union[Path, str]:
        """The version's folder: a Path, or a URI string on an object store."""
        if self.remote:
            return join_uri(self.uri, f"v{int(version)}")
        return self.root / f"v{int(version)}"

    def location(self, version: int, name: str = "") -> str:
        """A file of the version for messages and records: a path, or a URI on an object store."""
        if self.remote:
            return join_uri(self.path(version), name)
        return str(self.path(version) / name) if name else str(self.path(version))

    def _fs_path(self, version: int, name: str = "") -> str:
        """Path of the version (or a file in it) inside the object store's filesystem."""
        return f"{self.fs_root}/v{int(version)}" + (f"/{name}" if name else "")

    def _listed_versions(self) -> Tuple[List[int], List[int]]:
        """Object store: (complete, incomplete) version numbers under the root."""
        found = sorted(int(m.group(1)) for name in child_folders(self.fs, self.fs_root)
                       for m in [_VERSION_RE.match(name)] if m)
        metas = self.fs.get_file_info([self._fs_path(v, "meta.json") for v in found]) if found else []
        done = [v for v, i in zip(found, metas) if i.type == pafs.FileType.File]
        return done, [v for v in found if v not in done]

    def _delete_incomplete(self, version: int) -> None:
        if self.fs.get_file_info(self._fs_path(version, "meta.json")).type != pafs.FileType.File:
            delete_prefix(self.fs, self._fs_path(version))

    def versions(self) -> List[int]:
        """Complete versions (those with meta.json), ascending."""
        if self.remote:
            return self._listed_versions()[0]
        if not self.root.is_dir():
            return []
        out = []
        for d in self.root.iterdir():
            m = _VERSION_RE.match(d.name)
            if m and (d / "meta.json").is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    def latest(self) -> Optional[int]:
        v = self.versions()
        return v[-1] if v else None

    def clean_partial(self) -> List[str]:
        """Remove half-written versions a crash left behind; returns their names."""
        if self.remote:  # a version prefix without meta.json
            gone = []
            for v in self._listed_versions()[1]:
                self._delete_incomplete(v)
                gone.append(f"v{v}")
            return gone
        if not self.root.is_dir():
            return []
        gone = []
        for d in self.root.iterdir():
            if d.name.startswith(".v") and ".partial-" in d.name:
                shutil.rmtree(d, ignore_errors=True)
                gone.append(d.name)
        return gone

    def writer(self, version: int, meta: Dict[str, Any]) -> VersionWriter:
        if self.remote:
            if version in self.versions():  # never write parts into a committed version's prefix
                raise RunDirError(f"feature version {self.path(version)} already exists; remove it or write "
                                  f"v{version + 1}")
            self.clean_partial()
            return VersionWriter(self, version, meta)
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_partial()
        return VersionWriter(self, version, meta)

    def meta(self, version: int) -> Dict[str, Any]:
        if self.remote:
            path = self._fs_path(version, "meta.json")
            if self.fs.get_file_info(path).type != pafs.FileType.File:
                raise RunDirError(f"feature version v{version} is missing or incomplete in {self.root}; "
                                  f"complete versions: {self.versions()}")
            return json.loads(read_bytes(self.fs, path))
        p = self.path(version) / "meta.json"
        if not p.is_file():
            raise RunDirError(f"feature version v{version} is missing or incomplete in {self.root}; "
                              f"complete versions: {self.versions()}")
        return json.loads(p.read_text())

    def _parts(self, version: int, split: str, check_size: bool = False) -> List[Tuple[Path, Optional[Dict]]]:
        """The split's parts with their meta.json records (None for versions written before
        meta.json listed them); missing listed parts (and, with ``check_size``, parts of another
        size) raise."""
        meta = self.meta(version)
        if self.remote:
            return self._object_parts(version, meta, split, check_size)
        if "parts" not in meta:  # written before parts were listed: every part-*.parquet, unchecked
            folder = self.path(version) if split == POOL else self.path(version) / split
            files = sorted(folder.glob("part-*.parquet"))
            if not files:
                raise RunDirError(f"feature version v{version} has no {split!r} split in {self.root}")
            return [(f, None) for f in files]
        parts = [(self.path(version) / p["file"], p) for p in meta["parts"] if p["split"] == split]
        if not parts:
            raise RunDirError(f"feature version v{version} has no {split!r} split in {self.root}")
        for path, rec in parts:
            size = path.stat().st_size if path.is_file() else None
            if size is None or (check_size and size != rec["bytes"]):
                self._damaged(version, path, "is missing" if size is None else
                              f"has {size} bytes where meta.json lists {rec['bytes']}")
        return parts

    def _object_parts(self, version: int, meta: Dict[str, Any], split: str,
                      check_size: bool) -> List[Tuple[str, Dict]]:
        parts = [(self._fs_path(version, p["file"]), p) for p in meta.get("parts", []) if p["split"] == split]
        if not parts:
            raise RunDirError(f"feature version v{version} has no {split!r} split in {self.root}")
        for (path, rec), info in zip(parts, self.fs.get_file_info([p for p, _ in parts])):
            size = info.size if info.type == pafs.FileType.File else None
            if size is None or (check_size and size != rec["bytes"]):
                self._damaged(version, join_uri(self.path(version), rec["file"]), "is missing" if size is None else
                              f"has {size} bytes where meta.json lists {rec['bytes']}")
        return parts

    def _damaged(self, version: int, path: Union[Path, str], what: str) -> None:
        raise RunDirError(f"feature version v{version} is damaged: its part {path} {what}; delete "
                          f"{self.path(version)} and rerun to extract it again")

    def _files(self, version: int, split: str) -> List[Path]:
        return [p for p, _ in self._parts(version, split)]

    def verify(self, version: int) -> None:
        """Check every part of ``version`` against meta.json: present, same size, same sha256.

        Raises:
            RunDirError: naming the first damaged part and the fix.
        """
        for split in self.meta(version).get("splits", {POOL: None}):
            for path, rec in self._parts(version, split, check_size=True):
                digest = fs_digest(self.fs, path) if self.remote else file_digest(path) if rec is not None else None
                if rec is not None and digest["sha256"] != rec["sha256"]:
                    self._damaged(version, self._where(version, rec, path), "does not match the sha256 meta.json lists")

    def _where(self, version: int, rec: Optional[Dict], path) -> Union[Path, str]:
        """A part's name for messages: its path, or its URI on an object store."""
        return join_uri(self.path(version), rec["file"]) if self.remote else path

    def read(self, version: int, split: str = POOL) -> Tuple[np.ndarray, np.ndarray]:
        """All rows of a split in memory, sorted by id; every part is checked against the size
        and sha256 meta.json lists while it is read.

        Returns:
            ids: int64 (N,), ascending; features: float32 (N, D), row i belongs to ids[i].

        Raises:
            BadInputError: NaN or infinite values (naming the ids).
            RunDirError: a part is missing, or its bytes are not those meta.json lists.
        """
        # Streamed: each part is hashed in 8 MiB chunks, then decoded a row group at a time into
        # one preallocated matrix. Decoding a whole fixed-size-list column at once takes about 5x
        # its bytes (a 20 MB test split: +114 MB in the driver).
        parts = self._parts(version, split)
        if self.remote:
            return self._read_object_store(version, split, parts)
        files = []
        for path, rec in parts:
            try:
                files.append(_open_part(path))
            except (pa.ArrowException, OSError) as e:
                self._damaged(version, path, f"cannot be read as Parquet ({type(e).__name__}: {e})")
        mismatched = [path for path, rec in parts if rec is not None and file_digest(path) != {
            "bytes": rec["bytes"], "sha256": rec["sha256"]}]
        n = sum(f.metadata.num_rows for f in files)
        dim = files[0].schema_arrow.field("feature").type.list_size if files else 0
        ids = np.empty(n, dtype=np.int64)
        feats = np.empty((n, max(dim, 0)), dtype=np.float32)
        self._decode_parts(version, [(path, lambda f=f: f) for (path, _), f in zip(parts, files)], ids, feats)
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
                    at = _decode_into(f, None if second else ids, feats, at, rank)
                except (pa.ArrowException, OSError, ValueError) as e:
                    self._damaged(version, where, f"cannot be read as Parquet ({type(e).__name__}: {e})")
            if second:
                return
            rank = _sorted_rank(ids)
            if rank is None:
                return

    def _read_object_store(self, version: int, split: str, parts) -> Tuple[np.ndarray, np.ndarray]:
        """``read`` from an object store: each listed part is fetched whole (one GET, up to about
        ``PART_BYTES``), checked against its size and sha256, and decoded a row group at a time
        into one matrix sized from meta.json's row counts."""
        n = sum(int(rec["rows"]) for _, rec in parts)
        dim = int(self.meta(version)["splits"][split]["dim"] or 0)
        ids = np.empty(n, dtype=np.int64)
        feats = np.empty((n, dim), dtype=np.float32)

        def fetch(path, rec):  # the part's bytes, checked; freed when the next part is fetched
            where = self._where(version, rec, path)
            data = read_bytes(self.fs, path)
            if len(data) != rec["bytes"] or hashlib.sha256(data).hexdigest() != rec["sha256"]:
                self._damaged(version, where, "does not match the size and sha256 meta.json lists")
            try:
                f = _open_part(pa.BufferReader(data))
            except (pa.ArrowException, OSError, ValueError) as e:
                self._damaged(version, where, f"cannot be read as Parquet ({type(e).__name__}: {e})")
            if f.metadata.num_rows != int(rec["rows"]):
                self._damaged(version, where, f"holds {f.metadata.num_rows} rows where meta.json lists {rec['rows']}")
            return f

        self._decode_parts(version, [(self._where(version, rec, path), functools.partial(fetch, path, rec))
                                     for path, rec in parts], ids, feats)
        self._check_finite(version, split, ids, feats)
        return ids, feats

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
                cols.append(pq.read_table(path, columns=["id"], filesystem=self.fs if self.remote else None)
                            .column(0).to_numpy())
            except (pa.ArrowException, OSError) as e:
                self.verify(version)
                self._damaged(version, self._where(version, rec, path), f"cannot be read as Parquet ({type(e).__name__}: {e})")
        ids = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        return np.sort(ids.astype(np.int64, copy=False), kind="stable")

    def part_files(self, version: int, split: str = POOL) -> List[Union[Path, str]]:
        """The split's Parquet parts (for readers in other processes: shard actors), each checked
        to exist with the size meta.json lists; on an object store, their URIs."""
        parts = self._parts(version, split, check_size=True)
        if self.remote:
            return [join_uri(self.path(version), rec["file"]) for _, rec in parts]
        return [p for p, _ in parts]

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
        import ray.data

        self.meta(version)
        if self.remote:
            return ray.data.read_parquet(self._files(version, split), filesystem=self.fs)
        return ray.data.read_parquet([str(f) for f in self._files(version, split)])

    def remove(self, version: int) -> None:
        if self.remote:  # meta.json first: a crash midway leaves an incomplete version, never a damaged one
            meta = self._fs_path(version, "meta.json")
            if self.fs.get_file_info(meta).type == pafs.FileType.File:
                self.fs.delete_file(meta)
            delete_prefix(self.fs, self._fs_path(version))
            return
        shutil.rmtree(self.path(version), ignore_errors=True)


# Version 2 of the feature-cache key adds the device and the precision (issue 19). Entries of
# version 1 (made before; their meta.json records neither) have other names and are never reused.
# Version 3: resized pixels are rounded and clipped to uint8 levels before normalisation (the read
# tasks resize, issue 13); features of resized images differ from version 2's, so those are not reused.
CACHE_KEY_VERSION = 3


def cache_key(meta_inputs: Dict[str, Any], *, device: str, precision: str) -> str:
    """A key naming features by what determines them: backbone spec, weights hash, sources, and
    the device and precision they are computed in (bf16 GPU features are not fp32 CPU features).

    Args:
        meta_inputs: the backbone spec, weights hash, sources (a JSON-able dict).
        device: ``cpu`` or ``cuda`` (``asvp_ray.features.extract.Compute.device``).
        precision: ``fp32``, ``bf16`` or ``fp16``.
    """
    import hashlib

    inputs = {**meta_inputs, "cache_key_version": CACHE_KEY_VERSION, "device": device, "precision": precision}
    text = json.dumps(inputs, sort_keys=True, default=json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def check_cached_compute(meta: Dict[str, Any], device: str, precision: str, where: Path) -> None:
    """Refuse a cache entry whose meta.json says it was computed on another device or in another
    precision than its key promises (a copied or hand-made folder): never mix them silently.

    Raises:
        RunDirError: naming the entry, what it holds and the fix.
    """
    got = (meta.get("device"), meta.get("precision"))
    if got != (device, precision):
        raise RunDirError(f"feature cache entry {where} holds features computed on {got[0] or 'an unrecorded device'} "
                          f"in {got[1] or 'an unrecorded precision'}, but its key is for {device} in {precision}; "
                          "delete that folder and rerun")


def legacy_cache_entries(cache_root: Path) -> List[Path]:
    """Entries of a feature cache made before device and precision were part of the key (their
    v0/meta.json records no ``precision``); they are never reused."""
    out = []
    root = Path(cache_root)
    if not root.is_dir():
        return out
    for entry in sorted(root.iterdir()):
        meta = entry / "v0" / "meta.json"
        if meta.is_file():
            try:
                if "precision" not in json.loads(meta.read_text()):
                    out.append(entry)
            except (OSError, ValueError):
                continue
    return out


def link_version(src: Path, dst_store: "FeatureStore", version: int,
                 meta_update: Optional[Dict[str, Any]] = None) -> Path:
    """Make ``src`` (a complete version folder) appear as ``version`` of ``dst_store``, with hard
    links where the file system allows (no copy of the data), atomically. When either side is on
    an object store, the parts are copied instead (:func:`_copy_version`).

    Args:
        meta_update: keys to set in the new copy's ``meta.json`` (written as a file of its own,
            so ``src``'s stays as it was), e.g. the ``cost`` the run that made it was charged.
    """
    if dst_store.remote or is_uri(src):
        return _copy_version(src, dst_store, version, meta_update)
    dst_store.root.mkdir(parents=True, exist_ok=True)
    tmp = dst_store.root / f".v{version}.partial-{uuid.uuid4().hex[:8]}"

    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, tmp, copy_function=link)
    if meta_update:
        meta = json.loads((tmp / "meta.json").read_text())
        meta.update(meta_update)
        (tmp / "meta.json").unlink()  # a hard link to src's: do not write through it
        atomic_write_json(tmp / "meta.json", meta)
    os.rename(tmp, dst_store.path(version))
    fsync_dir(dst_store.root)
    return dst_store.path(version)


def _copy_version(src: Union[Path, str], dst_store: "FeatureStore", version: int,
                  meta_update: Optional[Dict[str, Any]] = None) -> Union[Path, str]:
    """Copy a complete version between a local folder and an object store (the feature cache is
    local; a run's store may be in a bucket): the parts meta.json lists first, then meta.json,
    committed the destination's way (a local partial folder renamed into place; on an object
    store, meta.json last in one PUT). A failed copy leaves nothing readable.

    Raises:
        RunDirError: ``src`` lists no parts (written by an older asvp-ray), or ``version`` exists.
    """
    if is_uri(src):
        src_fs, src_dir = resolve_uri(str(src))
    else:
        src_fs, src_dir = pafs.LocalFileSystem(), str(local_path(src))
    meta = json.loads(read_bytes(src_fs, f"{src_dir}/meta.json"))
    if "parts" not in meta:
        raise RunDirError(f"feature version {src} lists no parts in its meta.json (written by an older asvp-ray); "
                          "delete it and rerun to extract it again")
    meta.update(meta_update or {})
    data = (json.dumps(meta, indent=2, default=json_default) + "\n").encode()
    if dst_store.remote:
        if version in dst_store.versions():
            raise RunDirError(f"feature version {dst_store.path(version)} already exists; remove it or write "
                              f"v{version + 1}")
        dst_store.clean_partial()
        dst_fs, dst_dir, tmp = dst_store.fs, dst_store._fs_path(version), None
    else:
        dst_store.root.mkdir(parents=True, exist_ok=True)
        tmp = dst_store.root / f".v{version}.partial-{uuid.uuid4().hex[:8]}"
        dst_fs, dst_dir = pafs.LocalFileSystem(), str(tmp)
    try:
        for p in meta["parts"]:
            if tmp is not None:
                (tmp / p["file"]).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(f"{src_dir}/{p['file']}", f"{dst_dir}/{p['file']}", source_filesystem=src_fs,
                            destination_filesystem=dst_fs)
            if tmp is not None:
                with open(tmp / p["file"], "rb+") as f:
                    os.fsync(f.fileno())
        if tmp is None:
            put_bytes(dst_fs, f"{dst_dir}/meta.json", data)
            return dst_store.path(version)
        atomic_write_bytes(tmp / "meta.json", data)
        os.rename(tmp, dst_store.path(version))
    except BaseException:
        if tmp is None:
            try:
                dst_store._delete_incomplete(version)
            except OSError:  # the next writer removes it (clean_partial)
                pass
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(dst_store.root)
    return dst_store.path(version)
