"""Bring your own embeddings: a Parquet file or folder of ids and features (and optionally
labels and image paths) becomes feature version v0 with no extraction.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import pyarrow as pa

from asvp_ray.core.errors import BadInputError
from asvp_ray.data.base import duplicate_ids, labels_from_column
from asvp_ray.data.images import FileSource
from asvp_ray.storage.locations import location_fs


def open_parquet(path: str):
    """A ``pyarrow.dataset`` over a Parquet file or folder, local or a URI (``s3://``, ``gs://``,
    ``file://``), opened through ``pyarrow.fs``."""
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    fs, inner = location_fs(path)
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


class EmbeddingsSource(FileSource):
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
        dups = duplicate_ids(ids)
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
            labels, cls_out = labels_from_column(table.column("label"), classes,
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
