"""Parquet files whose rows hold the encoded image (``data.pool.kind: parquet_images``): an id
column, an image column (binary, or a struct with ``bytes`` as the Hugging Face datasets write
``image: {bytes, path}``) and an optional label column; names set by ``data.pool.id``, ``image``,
``label``.

The index (:mod:`asvp_ray.data.indexed`) holds each id's file, row group and row, read from the id
and label columns only; some ids are read back by row group. The whole pool is read by Ray Data's
``read_parquet``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import numpy as np
import pyarrow as pa

from asvp_ray.core.errors import BadInputError, ConfigError
from asvp_ray.data.indexed import INDEX_SCHEMA, IndexedSource, decoded_rows, file_uri, id_from_text
from asvp_ray.data.locate import fs_and_path, open_fs


def _image_bytes(col: pa.Array, where: str, image: str) -> pa.Array:
    """The encoded images of an image column: binary as it is, a struct's ``bytes`` field."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    t = col.type
    if pa.types.is_struct(t):
        if t.get_field_index("bytes") < 0:
            raise BadInputError(f"{where}: column {image} is a struct without a bytes field ({t}); name the column "
                                "holding encoded images in data.pool.image")
        return col.field("bytes")
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return col
    raise BadInputError(f"{where}: column {image} holds {t}, not encoded images (binary, or a struct with bytes); "
                        "name the image column in data.pool.image")


def check_schema(schema: pa.Schema, where: str, opts: Dict[str, Any]) -> None:
    names = schema.names
    for role in ("id", "image"):
        if opts[role] not in names:
            raise BadInputError(f"{where}: no column {opts[role]!r} for the {role} (it has {names}); name it in "
                                f"data.pool.{role}")
    if opts["label_set"] and opts["label"] not in names:
        raise BadInputError(f"{where}: no column {opts['label']!r} for the label (it has {names}); fix data.pool.label "
                            "or leave it unset for an unlabelled pool")
    _image_bytes(pa.array([], schema.field(opts["image"]).type), where, opts["image"])


def index_file(uri: str, file_no: int, opts: Dict[str, Any]) -> pa.Table:
    """One file's index rows from its id (and label) columns, row group by row group (a Ray task)."""
    import pyarrow.parquet as pq

    fs, path = fs_and_path(uri)
    where = f"parquet_images file {path}"
    try:
        with fs.open_input_file(path) as raw, pq.ParquetFile(raw) as f:
            schema = f.schema_arrow
            check_schema(schema, where, opts)
            cols = [opts["id"]] + ([opts["label"]] if opts["label"] in schema.names else [])
            out = {n: [] for n in INDEX_SCHEMA.names}
            for rg in range(f.num_row_groups):
                t = f.read_row_group(rg, columns=cols)
                raw_ids = t.column(opts["id"]).to_pylist()
                for r, v in enumerate(raw_ids):
                    out["id"].append(id_from_text(v, opts["hash_ids"], lambda: f"{where}, row group {rg}, row {r}",
                                                  f"column {opts['id']}"))
                out["file"] += [file_no] * len(raw_ids)
                out["loc_a"] += [rg] * len(raw_ids)
                out["loc_b"] += list(range(len(raw_ids)))
                out["key"] += [f"row group {rg}, row {r}, {opts['id']} {v}" for r, v in enumerate(raw_ids)]
                if opts["label"] in schema.names:
                    out["label_raw"] += [None if v is None else str(v) for v in t.column(opts["label"]).to_pylist()]
                else:
                    out["label_raw"] += [None] * len(raw_ids)
    except FileNotFoundError:
        raise BadInputError(f"{where} is missing; restore it or remove it from data.pool.path") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise BadInputError(f"{where}: not a readable Parquet file ({e}); restore or rewrite it") from None
    return pa.table(out, schema=INDEX_SCHEMA)


def read_rows(batch: Dict[str, np.ndarray], files: Dict[str, Any], skip_unreadable: bool, origin: str,
              options: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """A block of index rows (``id``, ``file``, ``loc_a`` row group, ``loc_b`` row) read by row
    group (the image column only) and decoded (a Ray Data task)."""
    import pyarrow.parquet as pq

    ids = np.asarray(batch["id"], dtype=np.int64)
    fno = np.asarray(batch["file"])
    rg = np.asarray(batch["loc_a"])
    row = np.asarray(batch["loc_b"])
    blobs: List[Any] = [None] * len(ids)
    for f in np.unique(fno):
        fs, path = fs_and_path(file_uri(files, f))
        in_f = np.flatnonzero(fno == f)
        try:
            with fs.open_input_file(path) as raw, pq.ParquetFile(raw) as pf:
                for g in np.unique(rg[in_f]):
                    rows = in_f[rg[in_f] == g]
                    col = _image_bytes(pf.read_row_group(int(g), columns=[options["image"]]).column(0),
                                       f"parquet_images file {path}", options["image"])
                    picked = col.take(pa.array(row[rows], pa.int64())).to_pylist()
                    for r, b in zip(rows, picked):
                        blobs[r] = b if b is not None else ValueError("the image is empty (null bytes)")
        except Exception as e:  # noqa: BLE001 - reported per image
            for r in in_f:
                if blobs[r] is None:
                    blobs[r] = e
    where = [f"file {files['paths'][int(f)]}, row group {int(g)}, row {int(r)}" for f, g, r in zip(fno, rg, row)]
    return decoded_rows(ids.tolist(), blobs, where, skip_unreadable, origin)


def decode_table(batch: pa.Table, options: Dict[str, Any], skip_unreadable: bool, origin: str):
    """``read_parquet``'s id and image columns as ``id``, ``image``, ``error`` (a Ray Data task)."""
    where_file = "parquet_images"
    raw_ids = batch.column(options["id"]).to_pylist()
    ids = [id_from_text(v, options["hash_ids"], lambda: f"{origin}, {options['id']} {v}", options["id"])
           for v in raw_ids]
    blobs = _image_bytes(batch.column(options["image"]), where_file, options["image"]).to_pylist()
    blobs = [b if b is not None else ValueError("the image is empty (null bytes)") for b in blobs]
    return decoded_rows(ids, blobs, [f"{options['id']} {v}" for v in raw_ids], skip_unreadable, origin)


class ParquetImagesSource(IndexedSource):
    """Parquet files with encoded images (see the module).

    Args:
        path: a file, a folder (its ``*.parquet`` files), a glob or a brace pattern; local or a URI.
        id, image, label: the columns (defaults ``id``, ``image``, ``label``; an unset label column
            that is absent means an unlabelled pool).
        hash_ids: number images by a 63-bit hash of the id column's text (ids that are not integers).
        classes: class names (index = label).
        index_dir: where the index is kept (the run's ``index/``).
    """

    kind = "parquet_images"
    file_kind = "file"
    suffixes = (".parquet",)
    files_key = "data.pool.path"

    @classmethod
    def from_config(cls, cfg, classes: Optional[List[str]] = None, index_dir=None) -> "ParquetImagesSource":
        """The source a ``SourceConfig`` of this kind describes (it needs ``path``)."""
        if not cfg.path and not cfg.shards:
            raise ConfigError("data source kind parquet_images needs path: a Parquet file, a folder of them, a glob "
                              "or a brace pattern (local or s3:// / gs://)")
        return cls(cfg.path or cfg.shards, id=cfg.id or "id", image=cfg.image or "image", label=cfg.label,
                   hash_ids=cfg.hash_ids, classes=classes, index_dir=index_dir)

    def __init__(self, path, id: str = "id", image: str = "image", label: Optional[str] = None,
                 hash_ids: bool = False, classes: Optional[List[str]] = None, index_dir=None):
        self.opts = {"id": id, "image": image, "label": label or "label", "label_set": label is not None,
                     "hash_ids": bool(hash_ids)}
        super().__init__(path, classes=classes, index_dir=index_dir)

    def _options(self):
        return self.opts

    def _index_task(self) -> Callable[..., pa.Table]:
        return index_file

    def _label_name(self) -> str:
        return f"column {self.opts['label']}"

    def _subset_reader(self):
        return read_rows

    def _full_dataset(self, skip_unreadable: bool):
        import ray.data

        from asvp_ray.data.base import ROWS_PER_BLOCK

        return ray.data.read_parquet(
            self.located.paths, filesystem=open_fs(self.located.where()), file_extensions=None,
        ).select_columns([self.opts["id"], self.opts["image"]]).map_batches(decode_table, fn_kwargs={"options": self.opts, "skip_unreadable": skip_unreadable,
                                               "origin": self.origin},
                      batch_size=ROWS_PER_BLOCK, batch_format="pyarrow")
