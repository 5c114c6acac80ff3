"""Where a feature store keeps its versions: a local folder (:class:`LocalBackend`) or an object
store reached through ``pyarrow.fs`` (:class:`ObjectStoreBackend`). :class:`FeatureStore
<asvp_ray.features.store.FeatureStore>` picks one in its constructor and leaves to it what
differs between the two: listing versions, removing a crash's leftovers, where a version is
written and how it is committed (a partial folder renamed into place, or meta.json last in one
PUT), reading parts and deleting versions. The guarantees both keep are in the store's module
docstring.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from asvp_ray.core.errors import RunDirError
from asvp_ray.features.parts import POOL, ObjectSplitWriter, SplitWriter, open_part
from asvp_ray.runtime.faults import fault_point
from asvp_ray.storage.atomic import atomic_write_bytes, file_digest, fs_digest, fsync_dir
from asvp_ray.storage.locations import (child_folders, delete_prefix, join_uri, local_path, put_bytes, read_bytes,
                                        resolve_uri)

_VERSION_RE = re.compile(r"^v(\d+)$")
# A part to decode: (its name for messages, a function giving its ParquetFile).
PartSource = Tuple[Union[Path, str], Callable[[], "pq.ParquetFile"]]


class _Backend:
    """What both backends share: the messages naming a damaged part or a missing split."""

    root: Union[Path, str]
    remote: bool

    def path(self, version: int) -> Union[Path, str]:
        raise NotImplementedError

    def damaged(self, version: int, path: Union[Path, str], what: str) -> NoReturn:
        raise RunDirError(f"feature version v{version} is damaged: its part {path} {what}; delete "
                          f"{self.path(version)} and rerun to extract it again")

    def _no_split(self, version: int, split: str) -> NoReturn:
        raise RunDirError(f"feature version v{version} has no {split!r} split in {self.root}")

    def _exists_error(self, version: int) -> RunDirError:
        return RunDirError(f"feature version {self.path(version)} already exists; remove it or write "
                           f"v{version + 1}")


class LocalBackend(_Backend):
    """Versions in a local folder: ``root/v{k}/``, each written into a hidden
    ``.v{k}.partial-*`` folder and renamed into place once every file is on disk."""

    remote = False

    def __init__(self, root: Union[os.PathLike, str]):
        self.root = local_path(root)

    def path(self, version: int) -> Path:
        return self.root / f"v{int(version)}"

    def location(self, version: int, name: str = "") -> str:
        return str(self.path(version) / name) if name else str(self.path(version))

    def where(self, version: int, rec: Optional[Dict], path: Path) -> Path:
        """A part's name for messages and for readers in other processes: its path."""
        return path

    def versions(self) -> List[int]:
        if not self.root.is_dir():
            return []
        out = []
        for d in self.root.iterdir():
            m = _VERSION_RE.match(d.name)
            if m and (d / "meta.json").is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    def clean_partial(self) -> List[str]:
        if not self.root.is_dir():
            return []
        gone = []
        for d in self.root.iterdir():
            if d.name.startswith(".v") and ".partial-" in d.name:
                shutil.rmtree(d, ignore_errors=True)
                gone.append(d.name)
        return gone

    # ---- writing a version: a partial folder, renamed into place
    def prepare_write(self, version: int) -> None:
        """Before a writer starts: the root exists, a crash's partial folders are gone."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_partial()

    def prepare_copy(self, version: int) -> None:
        """Before a copy from elsewhere starts (the feature cache): the root exists. Other
        partial folders stay: the cache is shared, they may be another run's copy under way."""
        self.root.mkdir(parents=True, exist_ok=True)

    def begin(self, version: int) -> Path:
        """A fresh partial folder for ``version`` (the staging area ``commit`` renames)."""
        tmp = self.root / f".v{version}.partial-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        return tmp

    def split_writer(self, staging: Path, version: int, split: str) -> SplitWriter:
        return SplitWriter(staging if split == POOL else staging / split)

    def copy_part(self, src_fs: pafs.FileSystem, src: str, staging: Path, version: int, name: str) -> None:
        """A part copied into the partial folder and flushed to disk."""
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(src, str(staging / name), source_filesystem=src_fs,
                        destination_filesystem=pafs.LocalFileSystem())
        with open(staging / name, "rb+") as f:
            os.fsync(f.fileno())

    def commit(self, staging: Path, version: int, meta: bytes) -> Path:
        """meta.json written last, then the folder renamed into place.

        Raises:
            RunDirError: the version exists.
        """
        atomic_write_bytes(staging / "meta.json", meta)
        if self.path(version).exists():
            raise self._exists_error(version)
        return self._rename(staging, version)

    def commit_copy(self, staging: Path, version: int, meta: bytes) -> Path:
        """A copy's commit: as :meth:`commit`, but a version already there (another run cached
        it first) fails the rename with an ``OSError``."""
        atomic_write_bytes(staging / "meta.json", meta)
        return self._rename(staging, version)

    def _rename(self, staging: Path, version: int) -> Path:
        os.rename(staging, self.path(version))
        fsync_dir(self.root)
        return self.path(version)

    def abort(self, staging: Path, version: int) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    # ---- reading
    def read_meta(self, version: int) -> Optional[Dict[str, Any]]:
        """The version's meta.json, None when the version is missing or incomplete."""
        p = self.path(version) / "meta.json"
        if not p.is_file():
            return None
        return json.loads(p.read_text())

    def parts(self, version: int, meta: Dict[str, Any], split: str,
              check_size: bool) -> List[Tuple[Path, Optional[Dict]]]:
        if "parts" not in meta:  # written before parts were listed: every part-*.parquet, unchecked
            folder = self.path(version) if split == POOL else self.path(version) / split
            files = sorted(folder.glob("part-*.parquet"))
            if not files:
                self._no_split(version, split)
            return [(f, None) for f in files]
        parts = [(self.path(version) / p["file"], p) for p in meta["parts"] if p["split"] == split]
        if not parts:
            self._no_split(version, split)
        for path, rec in parts:
            size = path.stat().st_size if path.is_file() else None
            if size is None or (check_size and size != rec["bytes"]):
                self.damaged(version, path, "is missing" if size is None else
                             f"has {size} bytes where meta.json lists {rec['bytes']}")
        return parts

    def digest(self, path: Path) -> Dict[str, Any]:
        return file_digest(path)

    def part_sources(self, version: int, meta: Dict[str, Any], split: str,
                     parts: List[Tuple[Path, Optional[Dict]]]) -> Tuple[int, int, List[PartSource], List[Path]]:
        """What ``read`` decodes: ``(rows, dim, sources, mismatched)``. Every part is opened (its
        footer gives the rows) and hashed first; the parts whose bytes differ from meta.json's
        record (``mismatched``) are reported after the decode, which names bad values by id."""
        files = []
        for path, rec in parts:
            try:
                files.append(open_part(path))
            except (pa.ArrowException, OSError) as e:
                self.damaged(version, path, f"cannot be read as Parquet ({type(e).__name__}: {e})")
        mismatched = [path for path, rec in parts if rec is not None and file_digest(path) != {
            "bytes": rec["bytes"], "sha256": rec["sha256"]}]
        n = sum(f.metadata.num_rows for f in files)
        dim = files[0].schema_arrow.field("feature").type.list_size if files else 0
        return n, dim, [(path, lambda f=f: f) for (path, _), f in zip(parts, files)], mismatched

    def read_id_column(self, path: Path) -> np.ndarray:
        return pq.read_table(path, columns=["id"]).column(0).to_numpy()

    def dataset(self, files: List[Path]):
        import ray.data

        return ray.data.read_parquet([str(f) for f in files])

    def remove(self, version: int) -> None:
        shutil.rmtree(self.path(version), ignore_errors=True)


class ObjectStoreBackend(_Backend):
    """Versions under a prefix of an object store (``s3://``, ``gs://``): ``v{k}/`` counts as
    complete once its meta.json exists, written last with one PUT.

    Args:
        uri: the store's URI; its query options are kept on every URI it hands out.
    """

    remote = True

    def __init__(self, uri: str):
        self.uri = join_uri(str(uri))
        self.root = self.uri
        self.fs, self.fs_root = resolve_uri(self.uri)

    def path(self, version: int) -> str:
        return join_uri(self.uri, f"v{int(version)}")

    def location(self, version: int, name: str = "") -> str:
        return join_uri(self.path(version), name)

    def where(self, version: int, rec: Optional[Dict], path: str) -> str:
        """A part's name for messages and for readers in other processes: its URI."""
        return join_uri(self.path(version), rec["file"])

    def fs_path(self, version: int, name: str = "") -> str:
        """Path of the version (or a file in it) inside the object store's filesystem."""
        return f"{self.fs_root}/v{int(version)}" + (f"/{name}" if name else "")

    def _listed_versions(self) -> Tuple[List[int], List[int]]:
        """(complete, incomplete) version numbers under the root."""
        found = sorted(int(m.group(1)) for name in child_folders(self.fs, self.fs_root)
                       for m in [_VERSION_RE.match(name)] if m)
        metas = self.fs.get_file_info([self.fs_path(v, "meta.json") for v in found]) if found else []
        done = [v for v, i in zip(found, metas) if i.type == pafs.FileType.File]
        return done, [v for v in found if v not in done]

    def _has_meta(self, version: int) -> bool:
        return self.fs.get_file_info(self.fs_path(version, "meta.json")).type == pafs.FileType.File

    def delete_incomplete(self, version: int) -> None:
        """The version's prefix deleted, unless its meta.json exists (then it is complete)."""
        if not self._has_meta(version):
            delete_prefix(self.fs, self.fs_path(version))

    def versions(self) -> List[int]:
        return self._listed_versions()[0]

    def clean_partial(self) -> List[str]:
        """Version prefixes without meta.json deleted."""
        gone = []
        for v in self._listed_versions()[1]:
            self.delete_incomplete(v)
            gone.append(f"v{v}")
        return gone

    # ---- writing a version: parts straight under v{k}/, meta.json the commit
    def prepare_write(self, version: int) -> None:
        """Before a writer starts: never write parts into a committed version's prefix; a crash's
        incomplete prefixes are removed."""
        if version in self.versions():
            raise self._exists_error(version)
        self.clean_partial()

    prepare_copy = prepare_write

    def begin(self, version: int) -> None:
        """No staging area: the parts go under ``v{k}/`` itself."""
        return None

    def split_writer(self, staging: None, version: int, split: str) -> ObjectSplitWriter:
        sub = () if split == POOL else (split,)
        return ObjectSplitWriter(join_uri(self.path(version), *sub), self.fs, "/".join((self.fs_path(version),) + sub))

    def copy_part(self, src_fs: pafs.FileSystem, src: str, staging: None, version: int, name: str) -> None:
        pafs.copy_files(src, self.fs_path(version, name), source_filesystem=src_fs, destination_filesystem=self.fs)

    def commit(self, staging: None, version: int, meta: bytes) -> str:
        """Every listed part is there (the split writers checked); meta.json is written with one
        PUT: the version exists from that moment, whole."""
        if self._has_meta(version):
            raise self._exists_error(version)
        fault_point(f"commit:v{version}")
        return self.commit_copy(staging, version, meta)

    def commit_copy(self, staging: None, version: int, meta: bytes) -> str:
        """A copy's commit: meta.json's PUT (``prepare_copy`` checked the version was not there)."""
        put_bytes(self.fs, self.fs_path(version, "meta.json"), meta)
        return self.path(version)

    def abort(self, staging: None, version: int) -> None:
        """No meta.json was written: the prefix is a leftover, never read."""
        try:
            self.delete_incomplete(version)
        except OSError:  # the next writer removes it (clean_partial)
            pass

    # ---- reading
    def read_meta(self, version: int) -> Optional[Dict[str, Any]]:
        if not self._has_meta(version):
            return None
        return json.loads(read_bytes(self.fs, self.fs_path(version, "meta.json")))

    def parts(self, version: int, meta: Dict[str, Any], split: str, check_size: bool) -> List[Tuple[str, Dict]]:
        parts = [(self.fs_path(version, p["file"]), p) for p in meta.get("parts", []) if p["split"] == split]
        if not parts:
            self._no_split(version, split)
        for (path, rec), info in zip(parts, self.fs.get_file_info([p for p, _ in parts])):
            size = info.size if info.type == pafs.FileType.File else None
            if size is None or (check_size and size != rec["bytes"]):
                self.damaged(version, join_uri(self.path(version), rec["file"]), "is missing" if size is None else
                             f"has {size} bytes where meta.json lists {rec['bytes']}")
        return parts

    def digest(self, path: str) -> Dict[str, Any]:
        return fs_digest(self.fs, path)

    def part_sources(self, version: int, meta: Dict[str, Any], split: str,
                     parts: List[Tuple[str, Dict]]) -> Tuple[int, int, List[PartSource], List[str]]:
        """What ``read`` decodes: ``(rows, dim, sources, [])``, sized from meta.json's row counts.
        Each part is fetched whole when it is decoded (one GET, up to about ``PART_BYTES``) and
        checked against its size and sha256 first."""
        n = sum(int(rec["rows"]) for _, rec in parts)
        dim = int(meta["splits"][split]["dim"] or 0)

        def fetch(path, rec):  # the part's bytes, checked; freed when the next part is fetched
            where = self.where(version, rec, path)
            data = read_bytes(self.fs, path)
            if len(data) != rec["bytes"] or hashlib.sha256(data).hexdigest() != rec["sha256"]:
                self.damaged(version, where, "does not match the size and sha256 meta.json lists")
            try:
                f = open_part(pa.BufferReader(data))
            except (pa.ArrowException, OSError, ValueError) as e:
                self.damaged(version, where, f"cannot be read as Parquet ({type(e).__name__}: {e})")
            if f.metadata.num_rows != int(rec["rows"]):
                self.damaged(version, where, f"holds {f.metadata.num_rows} rows where meta.json lists {rec['rows']}")
            return f

        return n, dim, [(self.where(version, rec, path), functools.partial(fetch, path, rec))
                        for path, rec in parts], []

    def read_id_column(self, path: str) -> np.ndarray:
        return pq.read_table(path, columns=["id"], filesystem=self.fs).column(0).to_numpy()

    def dataset(self, files: List[str]):
        import ray.data

        return ray.data.read_parquet(files, filesystem=self.fs)

    def remove(self, version: int) -> None:
        """meta.json first: a crash midway leaves an incomplete version, never a damaged one."""
        meta = self.fs_path(version, "meta.json")
        if self.fs.get_file_info(meta).type == pafs.FileType.File:
            self.fs.delete_file(meta)
        delete_prefix(self.fs, self.fs_path(version))
