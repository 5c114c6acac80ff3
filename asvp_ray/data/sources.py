"""Pool sources: where images enter. Each yields a Ray Dataset of ``id`` (int64) and ``image``.

Every sample carries a stable int64 id that never changes for the life of a run:
- Fashion-MNIST: the row index in the IDX file;
- image folder: a 63-bit hash of the path relative to the folder (so adding files later does not
  renumber the others);
- manifest: the ``id`` column, as written by the user.

Images are decoded inside Ray tasks, block by block, so a pool of millions of files streams.
"""
from __future__ import annotations

import hashlib
import io
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from asvp_ray.core.errors import BadInputError
from asvp_ray.core.registry import Registry

SOURCES: Registry["PoolSource"] = Registry("pool source")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
ROWS_PER_BLOCK = 1024


class PoolSource(ABC):
    """A set of images with stable ids and, when known, ground-truth labels.

    Subclasses build their index (ids, labels, paths) on construction, which is cheap: no
    image is decoded until ``to_dataset`` runs in Ray.
    """

    kind: str = ""

    @property
    @abstractmethod
    def ids(self) -> np.ndarray:
        """int64 ids, shape (N,), sorted ascending."""

    @property
    def labels(self) -> Optional[np.ndarray]:
        """int64 ground-truth labels aligned to ``ids`` (class indices), or None when unknown."""
        return None

    @property
    def classes(self) -> Optional[List[str]]:
        """Class names, index = label; None when the source carries no labels."""
        return None

    def __len__(self) -> int:
        return len(self.ids)

    def paths(self, ids: Sequence[int]) -> List[str]:
        """A path or URI a person can open for each id (for labelling tools)."""
        return [f"{self.kind}:{int(i)}" for i in ids]

    @abstractmethod
    def to_dataset(self, ids: Optional[np.ndarray] = None, skip_unreadable: bool = False):
        """A Ray Dataset with columns ``id`` (int64), ``image`` (uint8, HxW or HxWxC) and ``error``
        (empty string when the image was read; the reason when ``skip_unreadable`` dropped it).

        Args:
            ids: only these ids (default: all).
            skip_unreadable: mark unreadable images instead of failing the job.
        """

    @abstractmethod
    def describe(self) -> Dict[str, Any]:
        """A JSON-able description for the feature store's metadata."""

    def label_of(self, ids: np.ndarray) -> np.ndarray:
        """Ground-truth labels of ``ids`` (the simulated oracle's source of truth)."""
        if self.labels is None:
            raise BadInputError(f"{self.kind} source {self.describe()} has no labels; use a labelled source "
                                "or the human oracle")
        pos = np.searchsorted(self.ids, ids)
        bad = (pos >= len(self.ids)) | (self.ids[np.minimum(pos, len(self.ids) - 1)] != ids)
        if bad.any():
            raise BadInputError(f"ids not in the pool: {ids[bad][:10].tolist()}")
        return self.labels[pos]


def _is_sorted(ids: np.ndarray) -> bool:
    return bool(len(ids) < 2 or (ids[1:] >= ids[:-1]).all())


def _duplicates(ids: np.ndarray) -> np.ndarray:
    """The ids that occur more than once, sorted (no sorted copy when ``ids`` are sorted already)."""
    s = ids if _is_sorted(ids) else np.sort(ids)
    return np.unique(s[1:][s[1:] == s[:-1]])


def _positions(all_ids: np.ndarray, ids: Optional[np.ndarray]) -> np.ndarray:
    if ids is None:
        return np.arange(len(all_ids))
    ids = np.asarray(ids, dtype=np.int64)
    pos = np.searchsorted(all_ids, ids)
    ok = (pos < len(all_ids)) & (all_ids[np.minimum(pos, len(all_ids) - 1)] == ids)
    if not ok.all():
        raise BadInputError(f"ids not in the pool: {ids[~ok][:10].tolist()}")
    return pos


# --------------------------------------------------------------------------- Fashion-MNIST
@SOURCES.register("fashion_mnist")
class FashionMNISTSource(PoolSource):
    """Fashion-MNIST from its IDX files (train = pool, test = t10k), no torchvision downloader.

    Args:
        root: folder with the IDX files (default: found by ``fashion_mnist.find_root``).
        split: ``train`` or ``test``.
        limit: keep only the first ``limit`` samples (ids 0..limit-1), for small runs.
    """

    kind = "fashion_mnist"

    @classmethod
    def from_config(cls, cfg, classes: Optional[List[str]] = None) -> "FashionMNISTSource":
        """The source a ``SourceConfig`` of this kind describes."""
        return cls(root=cfg.root, split=cfg.split, limit=cfg.limit)

    def __init__(self, root: Optional[str] = None, split: str = "train", limit: Optional[int] = None):
        from asvp_ray.data import fashion_mnist as fm

        if split not in fm.SPLIT_PREFIX:
            raise BadInputError(f"fashion_mnist split {split!r} is not one of train, test")
        self.root = fm.find_root(root)
        self.split = split
        self.images_path, self.labels_path = fm.split_paths(self.root, split)
        _, shape, _ = fm.read_idx_header(self.images_path)
        n = shape[0] if limit is None else min(int(limit), shape[0])
        if n <= 0:
            raise BadInputError(f"fashion_mnist limit={limit} leaves no samples; use a positive limit")
        self._ids = np.arange(n, dtype=np.int64)
        self._labels = fm.read_idx(self.labels_path)[:n].astype(np.int64)
        self.limit = limit

    @property
    def ids(self) -> np.ndarray:
        return self._ids

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def classes(self) -> List[str]:
        from asvp_ray.data.fashion_mnist import CLASSES

        return list(CLASSES)

    def paths(self, ids: Sequence[int]) -> List[str]:
        return [f"{self.images_path}#{int(i)}" for i in ids]

    def to_dataset(self, ids=None, skip_unreadable=False):
        import ray.data

        pos = _positions(self._ids, ids)
        return ray.data.read_datasource(_IDXDatasource(str(self.images_path), pos, self._ids[pos]))

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind, "root": str(self.root), "split": self.split, "limit": self.limit,
                "rows": len(self._ids)}


class _IDXDatasource:
    """A Ray Data datasource over rows of an IDX image file (each read task decodes its slice)."""

    def __new__(cls, path: str, positions: np.ndarray, ids: np.ndarray):
        from ray.data.block import BlockMetadata
        from ray.data.datasource import Datasource, ReadTask

        class IDXDatasource(Datasource):
            def estimate_inmemory_data_size(self):
                return int(len(positions) * 28 * 28)

            def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
                # Each task decompresses the gzip file once, so tasks are few and large (8 blocks each).
                n_tasks = max(1, min(parallelism, -(-len(positions) // (8 * ROWS_PER_BLOCK))))
                tasks = []
                for pos_chunk, id_chunk in zip(np.array_split(positions, n_tasks), np.array_split(ids, n_tasks)):
                    if len(pos_chunk) == 0:
                        continue
                    meta = BlockMetadata(num_rows=len(pos_chunk), size_bytes=len(pos_chunk) * 28 * 28,
                                         input_files=[path], exec_stats=None)

                    def read(p=pos_chunk, i=id_chunk):
                        from ray.data.block import BlockAccessor

                        from asvp_ray.data.fashion_mnist import read_idx

                        imgs = read_idx(Path(path), p)
                        for s in range(0, len(i), ROWS_PER_BLOCK):
                            sl = slice(s, s + ROWS_PER_BLOCK)
                            yield BlockAccessor.batch_to_block(
                                {"id": i[sl], "image": imgs[sl], "error": np.array([""] * len(i[sl]), dtype=object)})

                    tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
                return tasks

        return IDXDatasource()


# --------------------------------------------------------------------------- files (folder, manifest)
def path_id(relpath: str) -> int:
    """A stable non-negative int64 id from a relative path (63-bit BLAKE2b hash)."""
    h = hashlib.blake2b(relpath.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") & 0x7FFF_FFFF_FFFF_FFFF


# One pyarrow filesystem per worker process and URI scheme + host (+ query: region, endpoint...):
# opening one per image costs a credentials lookup and a new connection pool each time.
_FILESYSTEMS: Dict[str, Any] = {}
_HOST_IN_PATH = ("s3", "gs", "gcs", "abfs", "abfss", "az")  # bucket / container: part of the inner path


def _filesystem(uri: str):
    """``(filesystem, path inside it)`` of a URI, the filesystem cached per scheme, host and query."""
    from urllib.parse import unquote, urlsplit

    import pyarrow.fs as pafs

    u = urlsplit(uri)
    key = f"{u.scheme}://{u.netloc}?{u.query}"
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        fs, inner = pafs.FileSystem.from_uri(uri)
        _FILESYSTEMS[key] = fs
        return fs, inner
    path = unquote(u.path)
    bucket = u.netloc.rsplit("@", 1)[-1]  # s3://KEY:SECRET@bucket/...: the credentials are not in the path
    return fs, (bucket + path if u.scheme in _HOST_IN_PATH else path)


def _read_image_bytes(path: str) -> bytes:
    if "://" in path:
        fs, p = _filesystem(path)
        with fs.open_input_stream(p) as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


# Remote images (object stores, http) are fetched this many at a time within a read task: one
# GET at a time would leave a task waiting on the network for most of its time.
REMOTE_READ_THREADS = 16
_READER = None  # one thread pool per worker process


def _read_all(paths: List[str]) -> List[Any]:
    """The bytes of each path, or the exception reading it raised; remote URIs concurrently."""
    global _READER

    def one(path: str):
        try:
            return _read_image_bytes(path)
        except Exception as e:  # noqa: BLE001 - reported per image by the caller
            return e

    if sum("://" in p for p in paths) < 2:
        return [one(p) for p in paths]
    if _READER is None:
        from concurrent.futures import ThreadPoolExecutor

        _READER = ThreadPoolExecutor(REMOTE_READ_THREADS, thread_name_prefix="asvp-read")
    return list(_READER.map(one, paths))


def decode_image(path: str) -> np.ndarray:
    """Read and fully decode one image file into a uint8 array (HxW or HxWx3).

    Raises:
        FileNotFoundError / OSError / PIL errors for missing, truncated or corrupt files.
    """
    return decode_bytes(_read_image_bytes(path))


def decode_bytes(data: bytes) -> np.ndarray:
    """Fully decode one encoded image into a uint8 array (HxW or HxWx3).

    Raises:
        PIL errors for truncated or corrupt data.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()  # forces a full decode, so truncated files fail here, not later
        if im.mode not in ("L", "RGB"):
            im = im.convert("RGB")
        return np.asarray(im, dtype=np.uint8)


def _decode_batch(batch: Dict[str, np.ndarray], skip_unreadable: bool, origin: str) -> Dict[str, Any]:
    images: List[np.ndarray] = []
    errors: List[str] = []
    paths = [str(p) for p in batch["path"]]
    for i, path, data in zip(batch["id"], paths, _read_all(paths)):
        try:
            if isinstance(data, Exception):
                raise data
            images.append(decode_bytes(data))
            errors.append("")
        except Exception as e:  # noqa: BLE001 - every decode failure is reported the same way
            kind = "missing file" if isinstance(e, FileNotFoundError) else "unreadable or corrupt image"
            msg = f"{origin}: id {int(i)}: {kind} {path!r} ({type(e).__name__}: {e})"
            if not skip_unreadable:
                raise BadInputError(msg + ". Fix the file, remove the row, or set "
                                    "data.skip_unreadable: true to skip such images (their ids are "
                                    "listed in the feature store's meta.json).") from None
            images.append(np.zeros((1, 1), dtype=np.uint8))
            errors.append(msg)
    out = np.empty(len(images), dtype=object)
    out[:] = images
    return {"id": np.asarray(batch["id"], dtype=np.int64), "image": out,
            "error": np.array(errors, dtype=object)}


def _absolute_paths(column, base, origin: str, suffix: str = ""):
    """A manifest's path column with relative paths joined to ``base`` (a folder, or a URI's folder
    for a manifest at a URI; ``suffix``: that URI's ``?options``, appended to the joined paths so
    they reach the same endpoint), URIs and absolute paths kept, as one Arrow string array: no
    Python string per row (at a million rows a list of them cost the driver ~360 bytes a row).
    Relative paths are normalised as ``pathlib`` joins them (``./`` and repeated slashes dropped).

    Raises:
        BadInputError: empty paths, naming how many.
    """
    import pyarrow.compute as pc

    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    col = col.cast(pa.large_string())
    empty = _empty_paths(col)
    if empty:
        raise BadInputError(f"{origin}: {empty} row(s) have an empty path; give every row its image file or URI")
    keep = pc.or_(pc.match_substring(col, "://"), pc.starts_with(col, "/"))
    if pc.all(keep).as_py():
        return col
    rel = col
    # each pass copies the column: only when some path needs it (most manifests have none)
    if pc.any(pc.match_substring(rel, "./")).as_py():
        rel = pc.replace_substring_regex(rel, r"(^|/)(\./)+", r"\1")
    if pc.any(pc.match_substring(rel, "//")).as_py():
        rel = pc.replace_substring_regex(rel, r"/{2,}", "/")
    joined = pc.binary_join_element_wise(pa.scalar(str(base), pa.large_string()), rel, pa.scalar("/", pa.large_string()))
    if suffix:
        joined = pc.binary_join_element_wise(joined, pa.scalar(suffix, pa.large_string()), pa.scalar("", pa.large_string()))
    if not pc.any(keep).as_py():
        return joined
    return pc.if_else(keep, col, joined)


class _FileSource(PoolSource):
    """Shared part of sources backed by image files: an index table (id, path, label)."""

    def __init__(self, ids: np.ndarray, paths, labels: Optional[np.ndarray],
                 classes: Optional[List[str]], origin: str):
        ids = np.asarray(ids, dtype=np.int64)
        order = None if _is_sorted(ids) else np.argsort(ids, kind="stable")
        self._ids = ids if order is None else ids[order]
        # an Arrow string array: at a million images a Python list of str costs ~3x the bytes;
        # None: no files (an embeddings pool without paths), named "<kind>:<id>" where asked
        if paths is not None:
            paths = paths if isinstance(paths, (pa.Array, pa.ChunkedArray)) else pa.array(paths, pa.large_string())
            if order is not None:
                paths = paths.take(pa.array(order))
            if isinstance(paths, pa.ChunkedArray):
                paths = paths.combine_chunks()
        self._paths = paths
        self._labels = None if labels is None else np.asarray(labels, dtype=np.int64)[slice(None) if order is None else order]
        self._classes = classes
        self.origin = origin

    @property
    def ids(self):
        return self._ids

    @property
    def labels(self):
        return self._labels

    @property
    def classes(self):
        return self._classes

    def paths(self, ids):
        pos = _positions(self._ids, np.asarray(ids, dtype=np.int64))
        if self._paths is None:
            return [f"{self.kind}:{int(i)}" for i in self._ids[pos]]
        return self._paths.take(pa.array(pos, pa.int64())).to_pylist()

    def to_dataset(self, ids=None, skip_unreadable=False):
        if ids is None:  # the index is in id order already: no copy of its paths
            return _decoded_dataset(self._ids, self._paths, skip_unreadable, self.origin)
        pos = _positions(self._ids, ids)
        return _decoded_dataset(self._ids[pos], self._paths.take(pa.array(pos, pa.int64())), skip_unreadable,
                                self.origin)


@SOURCES.register("image_folder")
class ImageFolderSource(_FileSource):
    """Images in a folder. Class subfolders give labels (sorted names = class indices); a flat
    folder of images has no labels.

    Args:
        root: the folder.
        classes: optional class names, fixing the label order (must match the subfolders).
    """

    kind = "image_folder"

    @classmethod
    def from_config(cls, cfg, classes: Optional[List[str]] = None) -> "ImageFolderSource":
        """The source a ``SourceConfig`` of this kind describes (it needs ``root``)."""
        from asvp_ray.core.errors import ConfigError

        if not cfg.root:
            raise ConfigError("data source kind image_folder needs root: the folder of images")
        return cls(cfg.root, classes=classes)

    def __init__(self, root: str, classes: Optional[List[str]] = None):
        rootp = Path(root)
        if not rootp.is_dir():
            raise BadInputError(f"image folder {root!r} does not exist or is not a folder; fix data.pool.root")
        subdirs = sorted(d.name for d in rootp.iterdir() if d.is_dir() and not d.name.startswith("."))
        rel: List[str] = []
        labels: Optional[List[int]] = None
        if subdirs:
            names = list(classes) if classes else subdirs
            missing = sorted(set(subdirs) - set(names))
            if missing:
                raise BadInputError(f"image folder {root}: subfolders {missing} are not in the configured "
                                    f"classes {names}; add them to data.classes or remove the folders")
            labels = []
            for d in subdirs:
                for dirpath, _, files in os.walk(rootp / d):
                    for f in files:
                        if f.lower().endswith(IMAGE_EXTENSIONS):
                            rel.append(os.path.relpath(os.path.join(dirpath, f), rootp))
                            labels.append(names.index(d))
            cls_out: Optional[List[str]] = names
        else:
            rel = sorted(f.name for f in rootp.iterdir() if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS))
            cls_out = list(classes) if classes else None
        if not rel:
            raise BadInputError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        ids = np.array([path_id(r) for r in rel], dtype=np.int64)
        if len(np.unique(ids)) != len(ids):  # astronomically unlikely; say so rather than mislabel
            raise BadInputError(f"image folder {root}: two paths hash to the same id; use a manifest with explicit ids")
        self.root = str(rootp)
        super().__init__(ids, [str(rootp / r) for r in rel],
                         None if labels is None else np.array(labels), cls_out, origin=f"image folder {root}")

    def describe(self):
        return {"kind": self.kind, "root": self.root, "rows": len(self._ids), "classes": self._classes}


@SOURCES.register("manifest")
class ManifestSource(_FileSource):
    """A Parquet or CSV manifest with columns ``id`` (integer), ``path`` and optional ``label``.

    Relative paths are resolved against the manifest's folder; URIs (``s3://``, ``gs://``,
    ``file://`` ...) are opened with pyarrow's filesystems. Labels may be class indices or names.

    Args:
        path: the manifest file (.parquet or .csv).
        classes: class names (index = label). Default: sorted distinct string labels, or
            ``0..max`` for integer labels.
    """

    kind = "manifest"

    @classmethod
    def from_config(cls, cfg, classes: Optional[List[str]] = None) -> "ManifestSource":
        """The source a ``SourceConfig`` of this kind describes (it needs ``path``)."""
        from asvp_ray.core.errors import ConfigError

        if not cfg.path:
            raise ConfigError("data source kind manifest needs path: a .parquet or .csv manifest")
        return cls(cfg.path, classes=classes)

    def __init__(self, path: str, classes: Optional[List[str]] = None):
        import pyarrow.fs as pafs

        self.path = str(path)
        self.remote = "://" in self.path and not self.path.startswith("file://")
        if self.remote:  # s3://bucket/dir/m.parquet?endpoint_override=...: relative paths join dir/
            from urllib.parse import urlsplit

            u = urlsplit(self.path)
            self.fs, self.file = _filesystem(self.path)
            self.base = f"{u.scheme}://{u.netloc}{u.path.rsplit('/', 1)[0]}"
            self.suffix = f"?{u.query}" if u.query else ""  # the manifest's options reach its images too
            name = u.path
        else:
            mpath = Path(self.path[len("file://"):] if self.path.startswith("file://") else self.path)
            self.fs, self.file = pafs.LocalFileSystem(), str(mpath.resolve())  # read tasks may run elsewhere
            self.base, self.suffix, name = str(mpath.resolve().parent), "", mpath.name
        if self._info().type != pafs.FileType.File:
            raise BadInputError(f"manifest {path!r} does not exist; fix data.pool.path")
        self.format = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}.get(Path(name).suffix.lower())
        if self.format is None:
            raise BadInputError(f"manifest {path}: unknown format {Path(name).suffix!r}; use .parquet or .csv")
        self._stamp = self._file_stamp()  # the paths are read again later: the file must not change
        origin = f"manifest {path}"
        cols = set(self._columns())
        missing = [c for c in ("id", "path") if c not in cols]
        if missing:
            raise BadInputError(f"manifest {path}: missing column(s) {missing}; it has {sorted(cols)}. "
                                "A manifest needs columns id (integer), path, and optionally label.")
        # the driver keeps ids and labels; the paths stay in the file (about 100 bytes a row: they
        # are read again by the read tasks, or for the few ids a fine-tune or a labeller needs)
        table = self._read([c for c in ("id", "label") if c in cols])
        id_col = table.column("id")
        if not pa.types.is_integer(id_col.type):
            bad = next((v for v in id_col.to_pylist() if not _is_int(v)), None)
            raise BadInputError(f"manifest {path}: column id must hold integers, found {bad!r} "
                                f"(type {id_col.type}); give every row a unique integer id")
        if id_col.null_count:
            raise BadInputError(f"manifest {path}: {id_col.null_count} row(s) have an empty id; every row needs one")
        ids = id_col.to_numpy().astype(np.int64)
        dups = _duplicates(ids)
        if len(dups):
            raise BadInputError(f"manifest {path}: duplicate ids {dups[:10].tolist()}; ids must be unique")
        empty = sum(_empty_paths(b.column(0)) for b in self._batches(["path"]))
        if empty:
            raise BadInputError(f"{origin}: {empty} row(s) have an empty path; give every row its image file or URI")
        labels = None
        cls_out = list(classes) if classes else None
        if "label" in cols:
            labels, cls_out = _labels_from_column(table.column("label"), classes, origin=origin, ids=ids)
        del table, id_col
        super().__init__(ids, None, labels, cls_out, origin=origin)

    # ---- reading the manifest (a column subset, whole or in batches)
    def _info(self):
        try:
            return self.fs.get_file_info(self.file)
        except OSError as e:
            raise BadInputError(f"manifest {self.path}: cannot be reached ({e}); check the URI and the "
                                "credentials") from None

    def _file_stamp(self):
        import pyarrow.fs as pafs

        info = self._info()
        if info.type != pafs.FileType.File:
            raise OSError("it is not there any more")
        return info.size, info.mtime_ns

    def _check_unchanged(self) -> None:
        """The manifest is read again for paths: refuse if it changed since this source opened it
        (an id's row could now name another image)."""
        try:
            now = self._file_stamp()
        except (OSError, BadInputError) as e:
            raise BadInputError(f"{self.origin}: can no longer be read ({e}); restore it (a run reads its paths "
                                "again for extraction, fine-tuning and labelling)") from None
        if now != self._stamp:
            raise BadInputError(f"{self.origin} changed since this run opened it (size or modification time); a "
                                "run's pool must not change under it: restore the file, or start a new run (or "
                                "resume, which opens it again) to use the new one")

    def _csv_options(self, columns: Sequence[str]):
        import pyarrow.csv as pacsv

        parse = pacsv.ParseOptions(delimiter="\t" if self.format == "tsv" else ",")
        convert = pacsv.ConvertOptions(column_types={"path": pa.string()}, include_columns=list(columns))
        return parse, convert

    def _columns(self) -> List[str]:
        try:
            if self.format == "parquet":
                import pyarrow.parquet as pq

                return pq.read_schema(self.file, filesystem=self.fs).names
            import pyarrow.csv as pacsv

            with self.fs.open_input_stream(self.file) as f, \
                    pacsv.open_csv(f, parse_options=self._csv_options([])[0]) as reader:
                return reader.schema.names
        except (pa.ArrowInvalid, OSError) as e:
            raise BadInputError(f"manifest {self.path}: cannot be parsed ({e})") from None

    def _read(self, columns: Sequence[str]) -> pa.Table:
        try:
            if self.format == "parquet":
                import pyarrow.parquet as pq

                return pq.read_table(self.file, columns=list(columns), filesystem=self.fs)
            import pyarrow.csv as pacsv

            parse, convert = self._csv_options(columns)
            with self.fs.open_input_stream(self.file) as f:
                return pacsv.read_csv(f, parse_options=parse, convert_options=convert)
        except pa.ArrowInvalid as e:
            raise BadInputError(f"manifest {self.path}: cannot be parsed ({e})") from None

    def _batches(self, columns: Sequence[str], batch_rows: int = 65_536):
        """The manifest's ``columns`` in record batches (this process holds one at a time)."""
        try:
            if self.format == "parquet":
                import pyarrow.parquet as pq

                with self.fs.open_input_file(self.file) as raw, pq.ParquetFile(raw) as f:
                    yield from f.iter_batches(batch_size=batch_rows, columns=list(columns))
                return
            import pyarrow.csv as pacsv

            parse, convert = self._csv_options(columns)
            with self.fs.open_input_stream(self.file) as raw, \
                    pacsv.open_csv(raw, parse_options=parse, convert_options=convert,
                                   read_options=pacsv.ReadOptions(block_size=8 << 20)) as reader:
                yield from reader
        except pa.ArrowInvalid as e:
            raise BadInputError(f"manifest {self.path}: cannot be parsed ({e})") from None

    def _path_array(self, ids: np.ndarray):
        """Resolved paths of ``ids`` (pool ids, in their order) as an Arrow string array, read from
        the manifest in batches: memory follows ``len(ids)``, not the manifest."""
        self._check_unchanged()
        ids = np.asarray(ids, dtype=np.int64)
        want = np.unique(ids)
        got_ids, got_paths = [], []
        for b in self._batches(["id", "path"]):
            bid = b.column(0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
            hit = np.isin(bid, want)
            if hit.any():
                got_ids.append(bid[hit])
                got_paths.append(b.column(1).filter(pa.array(hit)).cast(pa.large_string()))
        found = np.concatenate(got_ids) if got_ids else np.zeros(0, np.int64)
        order = np.argsort(found, kind="stable")
        pos = np.minimum(np.searchsorted(found[order], ids), max(len(found) - 1, 0))
        missing = ids[found[order][pos] != ids] if len(found) else ids
        if len(missing):  # never a neighbour's path for an id
            raise BadInputError(f"{self.origin}: ids {missing[:10].tolist()} are no longer in it; restore the file")
        if not len(ids):
            return pa.array([], pa.large_string())
        paths = _absolute_paths(pa.chunked_array(got_paths, pa.large_string()), self.base, self.origin, self.suffix)
        return paths.take(pa.array(order[pos], pa.int64()))

    def paths(self, ids):
        pos = _positions(self._ids, np.asarray(ids, dtype=np.int64))
        return self._path_array(self._ids[pos]).to_pylist()

    def to_dataset(self, ids=None, skip_unreadable=False):
        """Some ids: their paths are looked up here (a few thousand rows at most, for a fine-tune or
        a labeller). The whole pool: Ray Data reads the manifest in read tasks on this process's node
        (where the manifest is; zero CPUs, so a head without CPUs still runs them), the paths are
        resolved there, and the image reads and decodes run in 1,024-row blocks on any node."""
        import ray
        import ray.data

        if ids is not None:
            pos = _positions(self._ids, ids)
            return _decoded_dataset(self._ids[pos], self._path_array(self._ids[pos]), skip_unreadable, self.origin)
        self._check_unchanged()
        fn_kwargs = {"skip_unreadable": skip_unreadable, "origin": self.origin}
        here: Dict[str, Any] = {"num_cpus": 0}
        if not self.remote:  # a local manifest is on this node only
            here["label_selector"] = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
        if self.format == "parquet":
            ds = ray.data.read_parquet(self.file, filesystem=self.fs, **here).select_columns(["id", "path"])
        else:
            parse, convert = self._csv_options(["id", "path"])
            ds = ray.data.read_csv(self.file, filesystem=self.fs, parse_options=parse, convert_options=convert,
                                   file_extensions=None, **here)
        ds = ds.map_batches(_resolved_block, fn_kwargs={"base": self.base, "origin": self.origin,
                                                        "suffix": self.suffix},
                            batch_size=None, batch_format="pyarrow", **here)
        return ds.repartition(target_num_rows_per_block=ROWS_PER_BLOCK).map_batches(
            _decode_batch, fn_kwargs=fn_kwargs, batch_size=None, batch_format="numpy")

    def describe(self):
        return {"kind": self.kind, "path": self.path, "rows": len(self._ids), "classes": self._classes}


def _decoded_dataset(ids: np.ndarray, paths, skip_unreadable: bool, origin: str):
    """A Ray Dataset of ``ids`` and their ``paths`` (an Arrow string array, aligned) in
    ``ROWS_PER_BLOCK``-row blocks, each block read and decoded by a Ray Data task."""
    import ray.data

    tables = [pa.table({"id": pa.array(ids[s:s + ROWS_PER_BLOCK], pa.int64()),
                        "path": paths.slice(s, ROWS_PER_BLOCK).cast(pa.string())})
              for s in range(0, len(ids), ROWS_PER_BLOCK)]
    tables = tables or [pa.table({"id": pa.array([], pa.int64()), "path": pa.array([], pa.string())})]
    return ray.data.from_arrow(tables).map_batches(_decode_batch, fn_kwargs={"skip_unreadable": skip_unreadable,
                                                                              "origin": origin},
                                                   batch_size=None, batch_format="numpy")


def _empty_paths(col) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_length(col), 0))).as_py() or 0)


def _resolved_block(table: pa.Table, base: str, origin: str, suffix: str = "") -> pa.Table:
    """A block of a manifest's (id, path) rows with int64 ids and the paths resolved (a read task's
    side of ``ManifestSource.to_dataset``)."""
    return pa.table({"id": table.column("id").cast(pa.int64()),
                     "path": _absolute_paths(table.column("path"), base, origin, suffix).cast(pa.string())})


def open_parquet(path: str):
    """A ``pyarrow.dataset`` over a Parquet file or folder, local or a URI (``s3://``, ``gs://``,
    ``file://``), opened through ``pyarrow.fs``."""
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    if "://" in path:
        fs, inner = pafs.FileSystem.from_uri(path)
    else:
        fs, inner = pafs.LocalFileSystem(), str(Path(path).resolve())
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise BadInputError(f"embeddings {path!r} does not exist; fix data.pool.path (a Parquet file or folder)")
    return pads.dataset(inner, format="parquet", filesystem=fs)


def embedding_rows(batch, dim: Optional[int], origin: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(ids int64 (m,), features float32 (m, D))`` of a record batch or table with columns ``id``
    and ``feature`` (any list type), checked.

    Raises:
        BadInputError: rows with no feature, rows of another length than the first (or than
            ``dim``), naming the ids and ``origin`` (the embeddings' path).
    """
    ids = np.asarray(batch.column(0).to_numpy(), dtype=np.int64)
    col = batch.column(1)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.null_count:
        bad = ids[np.asarray(col.is_null())][:10].tolist()
        raise BadInputError(f"embeddings {origin}: ids {bad} have no feature")
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
    else:
        lengths = np.diff(col.offsets.to_numpy())
        width = int(lengths[0]) if len(lengths) else 0
        if (lengths != width).any():
            bad = ids[lengths != width][:10].tolist()
            raise BadInputError(f"embeddings {origin}: features of ids {bad} do not have {width} values "
                                "like the first row; every feature needs the same length")
    if dim is None:
        dim = width
    if width != dim:
        raise BadInputError(f"embeddings {origin}: a file holds {width}-value features, another {dim}")
    feats = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    return ids, feats


@SOURCES.register("embeddings")
class EmbeddingsSource(_FileSource):
    """Bring your own embeddings: a Parquet file or folder (local or URI) with columns ``id``
    (integer), ``feature`` (a fixed-size list of float32, or a list of equal length), and optionally
    ``label`` and ``path``. The rows become feature version v0 as they are, with no extraction, so
    ``svpp`` selection (and the human labelling flow) runs on CLIP / DINO / in-house embeddings of
    millions of images. ``asvp`` and ``standard`` fine-tune the backbone on the images: they need
    the ``path`` column.

    Only ``id``, ``label`` and ``path`` are read when the source opens; the features are read by
    Ray Data tasks that write feature version v0 (``features.embeddings``), never by the driver.

    Args:
        path: the file or folder.
        classes: class names (index = label).
    """

    kind = "embeddings"

    @classmethod
    def from_config(cls, cfg, classes: Optional[List[str]] = None) -> "EmbeddingsSource":
        from asvp_ray.core.errors import ConfigError

        if not cfg.path:
            raise ConfigError("data source kind embeddings needs path: a Parquet file or folder with columns id, "
                              "feature (and optionally label, path)")
        return cls(cfg.path, classes=classes)

    def __init__(self, path: str, classes: Optional[List[str]] = None):
        self.path = str(path)
        dataset = open_parquet(self.path)
        names = set(dataset.schema.names)
        missing = [c for c in ("id", "feature") if c not in names]
        if missing:
            raise BadInputError(f"embeddings {path}: missing column(s) {missing}; it has {sorted(names)}. Embeddings "
                                "need columns id (integer) and feature (a list of floats), and optionally label, path")
        ftype = dataset.schema.field("feature").type
        if not (pa.types.is_list(ftype) or pa.types.is_fixed_size_list(ftype) or pa.types.is_large_list(ftype)) or \
                not (pa.types.is_floating(ftype.value_type) or pa.types.is_integer(ftype.value_type)):
            raise BadInputError(f"embeddings {path}: column feature has type {ftype}; it must be a list of floats "
                                "(fixed_size_list<float32> is best)")
        self.dim = ftype.list_size if pa.types.is_fixed_size_list(ftype) else None
        cols = [c for c in ("id", "label", "path") if c in names]
        table = dataset.to_table(columns=cols)
        id_col = table.column("id")
        if not pa.types.is_integer(id_col.type) or id_col.null_count:
            raise BadInputError(f"embeddings {path}: column id must hold integers with no empty value "
                                f"(type {id_col.type}, {id_col.null_count} empty)")
        ids = id_col.to_numpy().astype(np.int64)
        dups = _duplicates(ids)
        if len(dups):
            raise BadInputError(f"embeddings {path}: duplicate ids {dups[:10].tolist()}; ids must be unique")
        self.has_paths = "path" in names
        if self.has_paths:
            base = Path(path).resolve().parent if "://" not in path and Path(path).is_file() else Path(path)
            paths = [p if p is None or "://" in p or os.path.isabs(p) else str(base / p)
                     for p in table.column("path").to_pylist()]
            empty = [int(i) for i, p in zip(ids, paths) if not p][:10]
            if empty:
                raise BadInputError(f"embeddings {path}: ids {empty} have an empty path; give every row one or "
                                    "drop the path column")
        else:
            paths = None  # paths(ids) names them embeddings:<id> (query files of human rounds)
        labels = None
        cls_out = list(classes) if classes else None
        if "label" in names:
            labels, cls_out = _labels_from_column(table.column("label"), classes,
                                                  origin=f"embeddings {path}", ids=ids)
        super().__init__(ids, paths, labels, cls_out, origin=f"embeddings {path}")

    def to_dataset(self, ids=None, skip_unreadable=False):
        if not self.has_paths:
            raise BadInputError(f"embeddings {self.path} has no path column, so its images cannot be read: "
                                "fine-tuning and feature refreshes (method asvp or standard, a final model) need "
                                "them. Add a path column, or use method: svpp with final.training_method: none")
        return super().to_dataset(ids, skip_unreadable)

    def files(self):
        """``(pyarrow filesystem, [file paths])`` of the Parquet file or folder (the files a
        ``pyarrow.dataset`` reads: names starting with ``_`` or ``.`` are not data)."""
        dataset = open_parquet(self.path)
        return dataset.filesystem, list(dataset.files)

    def iter_features(self, batch_rows: int = 65536):
        """``(ids int64 (m,), features float32 (m, D))`` batches in file order, read in this
        process (feature version v0 is written by Ray Data tasks instead: ``features.embeddings``).

        Raises:
            BadInputError: rows of different lengths, or NaN / infinite values (naming the ids).
        """
        dataset = open_parquet(self.path)
        dim = self.dim
        # one batch in flight (pyarrow reads ahead 16 batches and 4 files by default: gigabytes here)
        for batch in dataset.to_batches(columns=["id", "feature"], batch_size=batch_rows, batch_readahead=1,
                                        fragment_readahead=1):
            ids, feats = embedding_rows(batch, dim, self.path)
            dim = feats.shape[1]
            yield ids, feats

    def describe(self):
        return {"kind": self.kind, "path": self.path, "rows": len(self._ids), "dim": self.dim,
                "classes": self._classes}


def _is_int(v) -> bool:
    try:
        return float(v) == int(v)
    except (TypeError, ValueError):
        return False


def _labels_from_column(raw, classes: Optional[List[str]], origin: str, ids: np.ndarray):
    """Map a label column (names or indices; an Arrow array or a list) to class indices, or raise
    naming the bad rows. Each distinct value is looked up once (a million-row column holds a few)."""
    col = raw if isinstance(raw, (pa.Array, pa.ChunkedArray)) else pa.array(raw)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.null_count:
        bad = np.asarray(ids)[np.asarray(col.is_null())][:10].tolist()
        raise BadInputError(f"{origin}: ids {[int(i) for i in bad]} have no label; label every row or drop the "
                            "label column")
    enc = col.dictionary_encode()
    values = enc.dictionary.to_pylist()
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    if classes is None:
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            classes = [str(c) for c in range(max(values) + 1)] if values else []
        else:
            classes = sorted({str(v) for v in values})
    index = {c: k for k, c in enumerate(classes)}
    mapped = np.full(len(values), -1, dtype=np.int64)
    for k, v in enumerate(values):
        if str(v) in index:
            mapped[k] = index[str(v)]
        elif isinstance(v, (int, np.integer)) and 0 <= int(v) < len(classes):
            mapped[k] = int(v)
    out = mapped[codes]
    if (out < 0).any():
        rows = np.flatnonzero(out < 0)[:10]
        bad = [(int(ids[r]), values[codes[r]]) for r in rows]
        raise BadInputError(f"{origin}: label(s) not among the {len(classes)} classes ({', '.join(classes[:10])}"
                            f"{', ...' if len(classes) > 10 else ''}): " +
                            ", ".join(f"id {i}: {v!r}" for i, v in bad) +
                            ". Fix the labels or list the classes in data.classes")
    return out, list(classes)


def build_source(cfg, classes: Optional[List[str]] = None) -> PoolSource:
    """A ``PoolSource`` from a ``SourceConfig``: ``SOURCES[cfg.kind].from_config(cfg, classes)``.

    Raises:
        ConfigError: an unknown kind, or a key the source kind needs is missing.
    """
    return SOURCES.get(cfg.kind).from_config(cfg, classes)
