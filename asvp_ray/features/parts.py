"""The feature store's part format and its writers: Parquet files of ``id`` (int64) and
``feature`` (fixed_size_list<float32>[D]) in 4,096-row row groups.

``write_part`` is what an extraction worker runs (to a folder, or a folder's URI on an object
store); a version's splits are written by :class:`SplitWriter` (a local partial folder: its own
parts, then the workers' parts renamed in id order) or :class:`ObjectSplitWriter` (an object
store: every part written whole, never renamed). Reading helpers decode a part a row group at a
time into one preallocated matrix. The version around them is :mod:`asvp_ray.features.store`.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from asvp_ray.core.errors import BadInputError, RunDirError
from asvp_ray.storage.atomic import file_digest, fsync_dir
from asvp_ray.storage.locations import is_uri, join_uri, put_bytes, resolve_uri

ROWS_PER_FILE = 262_144
ROW_GROUP_ROWS = 4096
# Parts the extraction workers write: about PART_BYTES of features each, within these row bounds.
PART_BYTES = 32 << 20
MIN_ROWS_PER_PART, MAX_ROWS_PER_PART = 1024, 16_384
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


def _check_unique(ids: List[np.ndarray]) -> None:
    if ids:
        all_ids = np.concatenate(ids)
        if len(np.unique(all_ids)) != len(all_ids):
            u, c = np.unique(all_ids, return_counts=True)
            raise BadInputError(f"duplicate ids written to the feature store: {u[c > 1][:10].tolist()}")


class SplitWriter:
    """One split of a version in a local partial folder: parts written here (``add``, up to
    ``ROWS_PER_FILE`` rows each) and parts workers wrote into it (``add_part``)."""

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
        _check_unique(self.ids)
        fsync_dir(self.folder)

    def abort(self) -> None:
        """Close an open part (its folder is removed after)."""
        if self.writer is not None:
            self.writer.close()


class ObjectSplitWriter(SplitWriter):
    """One split of a version on an object store: every part is written whole under the version's
    prefix (by workers through ``write_part``, or by :meth:`add`, one part per call); nothing is
    renamed, and parts nobody reported are deleted before meta.json is written.

    Args:
        folder: the split's URI (what workers write to).
        fs, fs_folder: the object store's filesystem and the split's path inside it.
    """

    def __init__(self, folder: str, fs: pafs.FileSystem, fs_folder: str):
        self.folder = folder
        self.fs, self.fs_folder = fs, fs_folder
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
        _check_unique(self.ids)


def open_part(source) -> "pq.ParquetFile":
    """A part for decoding: no pre-buffering. ``pq.ParquetFile`` pre-buffers by default, i.e. reads
    the whole file's column chunks into memory before the first batch and keeps them while the
    file is open: with every part of a version open at once, a second copy of the pool (a
    200,000 x 256 version's read peaked at 2.5x its matrix, 1.4x without pre-buffering)."""
    return pq.ParquetFile(source, pre_buffer=False)


def decode_into(f: "pq.ParquetFile", ids: Optional[np.ndarray], feats: np.ndarray, at: int,
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


def sorted_rank(ids: np.ndarray) -> Optional[np.ndarray]:
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
