"""Image files as a pool: a folder of images (class subfolders give labels) and a manifest
(a Parquet or CSV file of ids, paths and labels, local or at a URI).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa

from asvp_ray.core.errors import BadInputError
from asvp_ray.data.base import ROWS_PER_BLOCK, duplicate_ids, id_positions, is_integral, labels_from_column
from asvp_ray.data.images import FileSource, decode_batch, decoded_dataset, empty_paths
from asvp_ray.storage.locations import is_uri, local_path, resolve_uri

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def path_id(relpath: str) -> int:
    """A stable non-negative int64 id from a relative path (63-bit BLAKE2b hash)."""
    h = hashlib.blake2b(relpath.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") & 0x7FFF_FFFF_FFFF_FFFF


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
    empty = empty_paths(col)
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


def _resolved_block(table: pa.Table, base: str, origin: str, suffix: str = "") -> pa.Table:
    """A block of a manifest's (id, path) rows with int64 ids and the paths resolved (a read task's
    side of ``ManifestSource.to_dataset``)."""
    return pa.table({"id": table.column("id").cast(pa.int64()),
                     "path": _absolute_paths(table.column("path"), base, origin, suffix).cast(pa.string())})


class ImageFolderSource(FileSource):
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


class ManifestSource(FileSource):
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
        self.remote = is_uri(self.path)
        if self.remote:  # s3://bucket/dir/m.parquet?endpoint_override=...: relative paths join dir/
            from urllib.parse import urlsplit

            u = urlsplit(self.path)
            self.fs, self.file = resolve_uri(self.path)
            self.base = f"{u.scheme}://{u.netloc}{u.path.rsplit('/', 1)[0]}"
            self.suffix = f"?{u.query}" if u.query else ""  # the manifest's options reach its images too
            name = u.path
        else:
            mpath = local_path(self.path)
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
            bad = next((v for v in id_col.to_pylist() if not is_integral(v)), None)
            raise BadInputError(f"manifest {path}: column id must hold integers, found {bad!r} "
                                f"(type {id_col.type}); give every row a unique integer id")
        if id_col.null_count:
            raise BadInputError(f"manifest {path}: {id_col.null_count} row(s) have an empty id; every row needs one")
        ids = id_col.to_numpy().astype(np.int64)
        dups = duplicate_ids(ids)
        if len(dups):
            raise BadInputError(f"manifest {path}: duplicate ids {dups[:10].tolist()}; ids must be unique")
        empty = sum(empty_paths(b.column(0)) for b in self._batches(["path"]))
        if empty:
            raise BadInputError(f"{origin}: {empty} row(s) have an empty path; give every row its image file or URI")
        labels = None
        cls_out = list(classes) if classes else None
        if "label" in cols:
            labels, cls_out = labels_from_column(table.column("label"), classes, origin=origin, ids=ids)
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
        pos = id_positions(self._ids, np.asarray(ids, dtype=np.int64))
        return self._path_array(self._ids[pos]).to_pylist()

    def to_dataset(self, ids=None, skip_unreadable=False):
        """Some ids: their paths are looked up here (a few thousand rows at most, for a fine-tune or
        a labeller). The whole pool: Ray Data reads the manifest in read tasks on this process's node
        (where the manifest is; zero CPUs, so a head without CPUs still runs them), the paths are
        resolved there, and the image reads and decodes run in 1,024-row blocks on any node."""
        import ray
        import ray.data

        if ids is not None:
            pos = id_positions(self._ids, ids)
            return decoded_dataset(self._ids[pos], self._path_array(self._ids[pos]), skip_unreadable, self.origin)
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
            decode_batch, fn_kwargs=fn_kwargs, batch_size=None, batch_format="numpy")

    def describe(self):
        return {"kind": self.kind, "path": self.path, "rows": len(self._ids), "classes": self._classes}
