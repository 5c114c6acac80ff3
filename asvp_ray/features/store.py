"""The versioned feature store: ``features/v{k}/`` holds Parquet parts and ``meta.json``.

Layout of one version::

    features/v0/meta.json             backbone, weights source and hash, data config, source, rows
    features/v0/part-00000.parquet    pool rows: id (int64), feature (fixed_size_list<float32>[D])
    features/v0/test/part-00000.parquet   the test split, same columns (when there is one)

A version is written into a hidden ``.v{k}.partial-*`` folder and renamed into place only when
every file (and meta.json, last) is flushed to disk, so a crash never leaves a half version that
looks complete; leftovers are removed by the next writer.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from asvp_ray._faults import fault_point
from asvp_ray.errors import BadInputError, RunDirError

ROWS_PER_FILE = 262_144
_VERSION_RE = re.compile(r"^v(\d+)$")
POOL = "pool"


def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise RunDirError(f"no space left on the device while writing {path}; the previous version of it "
                              "is intact. Free disk space and rerun the same command to continue.") from None
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


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

    def add(self, ids: np.ndarray, feats: np.ndarray) -> None:
        if len(ids) == 0:
            return
        if not np.isfinite(feats).all():
            bad = ids[~np.isfinite(feats).all(axis=1)][:10].tolist()
            raise BadInputError(f"features of ids {bad} contain NaN or infinity; check the backbone weights "
                                "and the images (or disable AMP)")
        if self.dim is None:
            self.dim = int(feats.shape[1])
        table = features_to_arrow(ids, feats)
        if self.writer is None or self.rows_in_part >= ROWS_PER_FILE:
            self._close_part()
            self.writer = pq.ParquetWriter(self.folder / f"part-{self.part:05d}.parquet", table.schema)
            self.part += 1
            self.rows_in_part = 0
        self.writer.write_table(table)
        self.rows_in_part += len(ids)
        self.rows += len(ids)
        self.ids.append(np.asarray(ids, dtype=np.int64))

    def _close_part(self):
        if self.writer is not None:
            self.writer.close()
            path = self.folder / f"part-{self.part - 1:05d}.parquet"
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            self.writer = None

    def close(self) -> None:
        self._close_part()
        if self.ids:
            all_ids = np.concatenate(self.ids)
            if len(np.unique(all_ids)) != len(all_ids):
                u, c = np.unique(all_ids, return_counts=True)
                raise BadInputError(f"duplicate ids written to the feature store: {u[c > 1][:10].tolist()}")
        fsync_dir(self.folder)


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
        self.tmp = store.root / f".v{version}.partial-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir(parents=True)
        self.splits: Dict[str, _SplitWriter] = {}
        self.committed = False

    def add(self, ids: np.ndarray, feats: np.ndarray, split: str = POOL) -> None:
        """Append rows of ``split`` (``pool`` or ``test``)."""
        if split not in self.splits:
            self.splits[split] = _SplitWriter(self.tmp if split == POOL else self.tmp / split)
        self.splits[split].add(ids, feats)
        self._batches = getattr(self, "_batches", 0) + 1
        fault_point(f"extract:v{self.version}:batch{self._batches}")

    def commit(self) -> Path:
        """Flush everything, write meta.json last, and rename the folder into place."""
        for w in self.splits.values():
            w.close()
        meta = dict(self.meta)
        meta["version"] = self.version
        meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        meta["splits"] = {name: {"rows": w.rows, "dim": w.dim} for name, w in self.splits.items()}
        meta["rows"] = meta["splits"].get(POOL, {}).get("rows", 0)
        meta["dim"] = meta["splits"].get(POOL, {}).get("dim")
        _fill_cost(meta)
        atomic_write_json(self.tmp / "meta.json", meta)
        final = self.store.path(self.version)
        if final.exists():
            raise RunDirError(f"feature version {final} already exists; remove it or write v{self.version + 1}")
        os.rename(self.tmp, final)
        fsync_dir(self.store.root)
        self.committed = True
        return final

    def abort(self) -> None:
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


class FeatureStore:
    """Versions of extracted features under ``root`` (a run's ``DIR/features``).

    Args:
        root: the store's folder (created on first write).
    """

    def __init__(self, root: os.PathLike):
        self.root = Path(root)

    def path(self, version: int) -> Path:
        return self.root / f"v{int(version)}"

    def versions(self) -> List[int]:
        """Complete versions (those with meta.json), ascending."""
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
        if not self.root.is_dir():
            return []
        gone = []
        for d in self.root.iterdir():
            if d.name.startswith(".v") and ".partial-" in d.name:
                shutil.rmtree(d, ignore_errors=True)
                gone.append(d.name)
        return gone

    def writer(self, version: int, meta: Dict[str, Any]) -> VersionWriter:
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_partial()
        return VersionWriter(self, version, meta)

    def meta(self, version: int) -> Dict[str, Any]:
        p = self.path(version) / "meta.json"
        if not p.is_file():
            raise RunDirError(f"feature version v{version} is missing or incomplete in {self.root}; "
                              f"complete versions: {self.versions()}")
        return json.loads(p.read_text())

    def _files(self, version: int, split: str) -> List[Path]:
        folder = self.path(version) if split == POOL else self.path(version) / split
        files = sorted(folder.glob("part-*.parquet"))
        if not files:
            raise RunDirError(f"feature version v{version} has no {split!r} split in {self.root}")
        return files

    def read(self, version: int, split: str = POOL) -> Tuple[np.ndarray, np.ndarray]:
        """All rows of a split in memory, sorted by id.

        Returns:
            ids: int64 (N,), ascending; features: float32 (N, D), row i belongs to ids[i].
        """
        self.meta(version)
        table = pa.concat_tables([pq.read_table(f) for f in self._files(version, split)])
        ids, feats = arrow_to_features(table)
        finite = np.isfinite(feats).all(axis=1)
        if not finite.all():
            raise BadInputError(f"feature version v{version} ({split}) in {self.path(version)} holds NaN or infinite "
                                f"values for ids {ids[~finite][:10].tolist()}; the files are damaged: delete "
                                f"{self.path(version)} and rerun to extract it again")
        order = np.argsort(ids, kind="stable")
        if not np.all(order == np.arange(len(ids))):
            ids, feats = ids[order], feats[order]
        return ids, np.ascontiguousarray(feats)

    def read_ids(self, version: int, split: str = POOL) -> np.ndarray:
        """The split's ids only (int64, sorted): 8 bytes a row, no feature is read."""
        self.meta(version)
        ids = np.concatenate([pq.read_table(f, columns=["id"]).column(0).to_numpy() for f in self._files(version, split)])
        return np.sort(ids.astype(np.int64, copy=False), kind="stable")

    def part_files(self, version: int, split: str = POOL) -> List[Path]:
        """The split's Parquet parts (for readers in other processes: shard actors)."""
        self.meta(version)
        return self._files(version, split)

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
        return ray.data.read_parquet([str(f) for f in self._files(version, split)])

    def remove(self, version: int) -> None:
        shutil.rmtree(self.path(version), ignore_errors=True)


# Version 2 of the feature-cache key adds the device and the precision (issue 19). Entries of
# version 1 (made before; their meta.json records neither) have other names and are never reused.
CACHE_KEY_VERSION = 2


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
    text = json.dumps(inputs, sort_keys=True, default=_json_default)
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
    links where the file system allows (no copy of the data), atomically.

    Args:
        meta_update: keys to set in the new copy's ``meta.json`` (written as a file of its own,
            so ``src``'s stays as it was), e.g. the ``cost`` the run that made it was charged.
    """
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
