"""Sources whose images sit inside larger files (WebDataset tar shards, Parquet files with image
bytes): :class:`IndexedSource`, their shared part.

When such a source opens it builds an **index**: per id, the file (shard) and where in it the
image is (a tar member's byte offset and size; a Parquet row group and row), plus the label when
the data carries one. Parallel tasks build it, one per file (Ray tasks when Ray is up, threads
otherwise); it is checked (duplicate ids across files, unreadable files) and written to the run
(``DIR/index/``) with each file's size and modification time, so a resume loads it instead of
reading every file again, and refuses files that changed since. Fine-tunes, labellers and the
final model then read only the images they need, by byte ranges or row groups.

The driver keeps per image the id, label, file number and two locator integers (36 bytes); the
keys and member names stay in the index file, read back for messages.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import pyarrow as pa

from asvp_ray.core.errors import BadInputError
from asvp_ray.data.base import ROWS_PER_BLOCK, PoolSource, duplicate_ids, id_positions, is_integral, labels_from_column
from asvp_ray.data.locate import Located, changed_files, differences, locate

log = logging.getLogger(__name__)

INDEX_VERSION = 1
# the index rows a file task returns: locators are the kind's (tar: data offset and size; Parquet:
# row group and row); ``key`` names the image in messages; ``label_raw`` is the label as the data
# writes it (null: none)
INDEX_SCHEMA = pa.schema([("id", pa.int64()), ("file", pa.int32()), ("loc_a", pa.int64()), ("loc_b", pa.int64()),
                          ("key", pa.large_string()), ("label_raw", pa.large_string())])


def id_from_text(text: Any, hash_ids: bool, where: Callable[[], str], key: str) -> int:
    """A pool id from the id field's value: the integer it writes, or with ``hash_ids`` a stable
    63-bit hash of its text (the image folder's rule for paths).

    Raises:
        BadInputError: not an integer (naming the image and the fix), or negative.
    """
    if hash_ids:
        from asvp_ray.data.files import path_id

        return path_id(str(text))
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value = int(text)
    else:
        try:  # "000123" and 123.0 are 123; int() first: a float loses digits past 2**53
            value = int(text.strip()) if isinstance(text, str) else int(text) if is_integral(text) else None
        except ValueError:
            value = int(float(text)) if is_integral(text) else None
    if value is None or isinstance(text, bool):
        raise BadInputError(f"{where()}: id {text!r} (from {key}) is not an integer; set data.pool.hash_ids: true "
                            "to number images by a hash of it, or name an integer field in data.pool.id")
    if not 0 <= value < 2 ** 63:
        raise BadInputError(f"{where()}: id {value} (from {key}) is outside 0 .. 2**63-1; renumber, or set "
                            "data.pool.hash_ids: true")
    return value


class IndexedSource(PoolSource):
    """A pool in a set of files, with an index built when it opens (see the module).

    Subclasses set ``kind``, ``file_kind`` (``"shard"``), ``suffixes``, ``key`` (the config key
    naming the files) and implement :meth:`_index_task` (a picklable function indexing one
    file), :meth:`_options` (what changes the index), :meth:`_subset_dataset` and
    :meth:`_full_dataset`.
    """

    file_kind = "file"
    suffixes: tuple = ()
    files_key = "data.pool.path"

    def __init__(self, spec, classes: Optional[List[str]] = None, index_dir: Optional[Path] = None):
        self.spec = spec
        self.located = locate(spec, suffixes=self.suffixes, key=self.files_key, what=self.file_kind)
        self.origin = f"{self.kind} {spec if isinstance(spec, str) else list(spec)}"
        self.index_path: Optional[Path] = None
        table = None
        if index_dir is not None:
            self.index_path = Path(index_dir) / f"{self.kind}-{self._digest()}.parquet"
            if self.index_path.is_file():
                table = self._load_index()
        if table is None:
            table = self._build_index()
            if self.index_path is not None:
                self._save_index(table)
        self._adopt(table, classes)

    # ------------------------------------------------------------------ the index
    def _options(self) -> Dict[str, Any]:
        return {}

    def _digest(self) -> str:
        what = {"kind": self.kind, "spec": self.spec, "options": self._options(), "index_version": INDEX_VERSION}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _index_task(self) -> Callable[..., pa.Table]:
        raise NotImplementedError

    def _build_index(self) -> pa.Table:
        n = len(self.located.paths)
        t0 = time.perf_counter()
        fn = self._index_task()
        opts = self._options()
        args = [(self.located.uri(i), i, opts) for i in range(n)]
        tables = _run_parallel(fn, args, f"indexing {n} {self.file_kind}(s) of {self.origin}")
        table = pa.concat_tables(tables).combine_chunks() if tables else INDEX_SCHEMA.empty_table()
        self._check_duplicates(table)
        log.info("indexed %d image(s) in %d %s(s) of %s in %.1f s", table.num_rows, n, self.file_kind, self.origin,
                 time.perf_counter() - t0)
        self.index_seconds = time.perf_counter() - t0
        return table

    def _check_duplicates(self, table: pa.Table) -> None:
        ids = table.column("id").to_numpy()
        dups = duplicate_ids(ids)
        if not len(dups):
            return
        rows = np.flatnonzero(np.isin(ids, dups[:3]))
        files = table.column("file").to_numpy()
        keys = table.column("key")
        seen: Dict[int, List[str]] = {}
        for r in rows:
            seen.setdefault(int(ids[r]), []).append(f"{self.located.paths[files[r]]} ({keys[int(r)].as_py()})")
        shown = "; ".join(f"id {i} in {' and '.join(w)}" for i, w in seen.items())
        raise BadInputError(f"{self.origin}: {len(dups)} id(s) occur more than once: {shown}. Ids must be unique "
                            f"across {self.file_kind}s: remove the repeated images, or set data.pool.hash_ids: true "
                            "if the ids come from keys that only repeat as numbers")

    def _save_index(self, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        from asvp_ray.storage.atomic import atomic_write_bytes

        meta = {"kind": self.kind, "index_version": INDEX_VERSION, "options": self._options(),
                "files": {"paths": self.located.paths, "sizes": self.located.sizes, "mtimes": self.located.mtimes}}
        sink = pa.BufferOutputStream()
        pq.write_table(table.replace_schema_metadata({"asvp_index": json.dumps(meta)}), sink)
        atomic_write_bytes(self.index_path, sink.getvalue().to_pybytes())

    def _load_index(self) -> pa.Table:
        import pyarrow.parquet as pq

        table = pq.read_table(self.index_path)
        meta = json.loads(table.schema.metadata[b"asvp_index"])
        files = meta["files"]
        if files["paths"] != self.located.paths:
            raise BadInputError(f"{self.origin}: the {self.file_kind}s listed now differ from those this run "
                                f"indexed ({len(files['paths'])} then, {len(self.located.paths)} now); a run's pool "
                                f"must not change: restore the {self.file_kind}s or start a new run")
        then = Located(self.located.prefix, self.located.options, files["paths"], files["sizes"], files["mtimes"])
        changed = differences(then, self.located)  # locate() listed every file's size and time just now
        if changed:
            raise BadInputError(self._changed_message(changed))
        self.located = then
        log.info("index of %s loaded from %s (%d images)", self.origin, self.index_path, table.num_rows)
        return table.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)

    def _changed_message(self, changed: List[str]) -> str:
        return (f"{self.origin}: {len(changed)} {self.file_kind}(s) changed since the index was built: "
                f"{'; '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}. An index names byte ranges and rows "
                f"in the {self.file_kind}s as they were: restore them, or start a new run to index the new ones")

    def _adopt(self, table: pa.Table, classes: Optional[List[str]]) -> None:
        """Keep the index's arrays in id order (keys stay in the file)."""
        ids = table.column("id").to_numpy()
        order = np.argsort(ids, kind="stable")
        self._ids = ids[order]
        self._file = table.column("file").to_numpy()[order].astype(np.int32)
        self._loc_a = table.column("loc_a").to_numpy()[order]
        self._loc_b = table.column("loc_b").to_numpy()[order]
        raw = table.column("label_raw").combine_chunks().take(pa.array(order))
        self._missing_label = np.asarray(raw.is_null(), dtype=bool)
        self._labels = None
        self._classes = list(classes) if classes else None
        if not self._missing_label.all():
            have = ~self._missing_label
            present = raw.filter(pa.array(have))
            values = present.to_pylist()
            if all(is_integral(v) for v in values):
                present = pa.array([int(float(v)) for v in values], pa.int64())
            lab, self._classes = labels_from_column(present, classes, self.origin, self._ids[have])
            self._labels = np.full(len(self._ids), -1, dtype=np.int64)
            self._labels[have] = lab
        # keys stay in the index file; a source whose index is not kept holds them (no run: tests, tools)
        self._keys_table = None if self.index_path is not None else table.select(["id", "key"])

    # ------------------------------------------------------------------ what a PoolSource answers
    @property
    def ids(self) -> np.ndarray:
        return self._ids

    @property
    def labels(self) -> Optional[np.ndarray]:
        return self._labels

    @property
    def classes(self) -> Optional[List[str]]:
        return self._classes

    def missing_labels(self) -> int:
        """How many images have no label member/value (0 when all or none do)."""
        return 0 if self._labels is None else int(self._missing_label.sum())

    def check_labels_for_oracle(self) -> None:
        """A simulated oracle needs every label: refuse, naming the first images without one."""
        if self._labels is None:
            raise BadInputError(f"{self.origin} has no labels (no {self._label_name()} in the data), so the simulated "
                                f"oracle has nothing to reveal; set data.pool.label, or use oracle: human")
        missing = np.flatnonzero(self._missing_label)
        if len(missing):
            shown = ", ".join(self.describe_image(int(self._ids[r])) for r in missing[:5])
            raise BadInputError(f"{self.origin}: {len(missing)} image(s) have no label ({self._label_name()}) but the "
                                f"oracle is simulated: {shown}. Add the labels, or use oracle: human")

    def _label_name(self) -> str:
        return "label"

    def label_of(self, ids: np.ndarray) -> np.ndarray:
        if self._labels is None:
            return super().label_of(ids)
        pos = id_positions(self._ids, np.asarray(ids, dtype=np.int64))
        bad = self._missing_label[pos]
        if bad.any():
            shown = ", ".join(self.describe_image(int(i)) for i in self._ids[pos[bad]][:5])
            raise BadInputError(f"{self.origin}: no label for {shown}; add it ({self._label_name()}) or use "
                                "oracle: human")
        return self._labels[pos]

    def _key_of(self, ids: np.ndarray) -> Dict[int, str]:
        """The keys of ``ids`` (read from the index file, or rebuilt rows when it is not kept)."""
        if self._keys_table is None:
            import pyarrow.parquet as pq

            self._keys_table = pq.read_table(self.index_path, columns=["id", "key"])
        t = self._keys_table
        hit = np.isin(t.column("id").to_numpy(), ids)
        return dict(zip(t.column("id").filter(pa.array(hit)).to_pylist(), t.column("key").filter(pa.array(hit)).to_pylist()))

    def describe_image(self, i: int) -> str:
        """``id I (FILE, key K)``: where an image is, for messages."""
        pos = id_positions(self._ids, np.array([i], dtype=np.int64))[0]
        key = self._key_of(np.array([i]))[int(i)]
        return f"id {i} ({self.located.paths[self._file[pos]]}, {key})"

    def paths(self, ids):
        pos = id_positions(self._ids, np.asarray(ids, dtype=np.int64))
        keys = self._key_of(self._ids[pos])
        return [f"{self.located.uri(self._file[p])}#{keys[int(self._ids[p])]}" for p in pos]

    def check_unchanged(self, files: Optional[np.ndarray] = None) -> None:
        """Refuse to read files that changed since the index was built (size or modification time)."""
        changed = changed_files(self.located, None if files is None else np.unique(files).tolist())
        if changed:
            raise BadInputError(self._changed_message(changed))

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind, "files": self.spec, "count": len(self.located.paths), "rows": len(self._ids),
                "classes": self._classes, "options": self._options()}

    # ------------------------------------------------------------------ images
    def to_dataset(self, ids=None, skip_unreadable=False):
        """The whole pool: the kind's own Ray Data reader over every file. Some ids: their index
        rows in blocks of ``ROWS_PER_BLOCK`` in the order of ``ids`` (as every source returns
        them: a fine-tune's batches must not depend on how the pool is stored), each block's
        images read by byte ranges or row groups in a Ray Data task."""
        import ray.data

        if ids is None:
            self.check_unchanged()
            return self._full_dataset(skip_unreadable)
        pos = id_positions(self._ids, ids)
        self.check_unchanged(self._file[pos])
        tables = [pa.table({"id": pa.array(self._ids[p]), "file": pa.array(self._file[p]),
                            "loc_a": pa.array(self._loc_a[p]), "loc_b": pa.array(self._loc_b[p])})
                  for p in (pos[s:s + ROWS_PER_BLOCK] for s in range(0, len(pos), ROWS_PER_BLOCK))]
        tables = tables or [pa.table({"id": pa.array([], pa.int64()), "file": pa.array([], pa.int32()),
                                      "loc_a": pa.array([], pa.int64()), "loc_b": pa.array([], pa.int64())})]
        return ray.data.from_arrow(tables).map_batches(
            self._subset_reader(), fn_kwargs={"files": self._files_arg(), "skip_unreadable": skip_unreadable,
                                              "origin": self.origin, "options": self._options()},
            batch_size=None, batch_format="numpy")

    def _files_arg(self) -> Dict[str, Any]:
        return {"prefix": self.located.prefix, "options": self.located.options, "paths": self.located.paths}

    def _subset_reader(self) -> Callable:
        raise NotImplementedError

    def _full_dataset(self, skip_unreadable: bool):
        raise NotImplementedError


def file_uri(files: Dict[str, Any], i: int) -> str:
    return f"{files['prefix']}{files['paths'][int(i)]}{files['options']}"


def decoded_rows(ids: List[int], blobs: List[Any], where: List[str], skip_unreadable: bool,
                 origin: str) -> Dict[str, np.ndarray]:
    """A decoded block: ``id``, ``image``, ``error`` from encoded images (an exception in place of
    bytes: that image could not be read), each failure naming the image (``where``)."""
    from asvp_ray.data.images import decode_bytes

    images, errors = [], []
    for i, data, w in zip(ids, blobs, where):
        try:
            if isinstance(data, Exception):
                raise data
            images.append(decode_bytes(data))
            errors.append("")
        except Exception as e:  # noqa: BLE001 - every failure is reported the same way
            msg = f"{origin}: id {int(i)} ({w}): image does not decode ({type(e).__name__}: {e})"
            if not skip_unreadable:
                raise BadInputError(msg + ". Replace the image, remove it from the data, or set "
                                    "data.skip_unreadable: true to skip such images (their ids are listed in the "
                                    "feature store's meta.json)") from None
            images.append(np.zeros((1, 1), dtype=np.uint8))
            errors.append(msg)
    out = np.empty(len(images), dtype=object)
    out[:] = images
    return {"id": np.asarray(ids, dtype=np.int64), "image": out, "error": np.array(errors, dtype=object)}


def _run_parallel(fn: Callable, args: List[tuple], what: str) -> List[pa.Table]:
    """``fn(*a)`` for each of ``args``: Ray tasks (CPU-node placement) when Ray is up, else threads."""
    import ray

    log.info("%s", what)
    if ray.is_initialized():
        from asvp_ray.runtime.placement import cpu_options
        from asvp_ray.runtime.ray_utils import unwrap_error

        task = ray.remote(num_cpus=1, max_retries=2, retry_exceptions=[OSError])(fn).options(**cpu_options())
        refs = [task.remote(*a) for a in args]
        try:
            return ray.get(refs)
        except Exception as e:  # noqa: BLE001 - an asvp error from a task, as itself
            raise unwrap_error(e) from None
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as ex:
        return list(ex.map(lambda a: fn(*a), args))
