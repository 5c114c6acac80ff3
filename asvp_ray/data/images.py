"""Sources backed by image files: reading them (local paths, or URIs through ``pyarrow.fs``:
one filesystem per process for each bucket and options, :func:`asvp_ray.storage.locations.resolve_uri`),
decoding them in Ray Data tasks, and :class:`FileSource`, the shared part of the image folder,
manifest and embeddings sources (an index of ids, paths and labels).
"""
from __future__ import annotations

import io
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa

from asvp_ray.core.errors import BadInputError
from asvp_ray.data.base import ROWS_PER_BLOCK, PoolSource, id_positions, is_sorted
from asvp_ray.storage.locations import resolve_uri


def _read_image_bytes(path: str) -> bytes:
    if "://" in path:
        fs, p = resolve_uri(path)
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


def decode_batch(batch: Dict[str, np.ndarray], skip_unreadable: bool, origin: str) -> Dict[str, Any]:
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


def decoded_dataset(ids: np.ndarray, paths, skip_unreadable: bool, origin: str):
    """A Ray Dataset of ``ids`` and their ``paths`` (an Arrow string array, aligned) in
    ``ROWS_PER_BLOCK``-row blocks, each block read and decoded by a Ray Data task."""
    import ray.data

    tables = [pa.table({"id": pa.array(ids[s:s + ROWS_PER_BLOCK], pa.int64()),
                        "path": paths.slice(s, ROWS_PER_BLOCK).cast(pa.string())})
              for s in range(0, len(ids), ROWS_PER_BLOCK)]
    tables = tables or [pa.table({"id": pa.array([], pa.int64()), "path": pa.array([], pa.string())})]
    return ray.data.from_arrow(tables).map_batches(decode_batch, fn_kwargs={"skip_unreadable": skip_unreadable,
                                                                              "origin": origin},
                                                   batch_size=None, batch_format="numpy")


def empty_paths(col) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_length(col), 0))).as_py() or 0)


class FileSource(PoolSource):
    """Shared part of sources backed by image files: an index table (id, path, label)."""

    def __init__(self, ids: np.ndarray, paths, labels: Optional[np.ndarray],
                 classes: Optional[List[str]], origin: str):
        ids = np.asarray(ids, dtype=np.int64)
        order = None if is_sorted(ids) else np.argsort(ids, kind="stable")
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
        pos = id_positions(self._ids, np.asarray(ids, dtype=np.int64))
        if self._paths is None:
            return [f"{self.kind}:{int(i)}" for i in self._ids[pos]]
        return self._paths.take(pa.array(pos, pa.int64())).to_pylist()

    def to_dataset(self, ids=None, skip_unreadable=False):
        if ids is None:  # the index is in id order already: no copy of its paths
            return decoded_dataset(self._ids, self._paths, skip_unreadable, self.origin)
        pos = id_positions(self._ids, ids)
        return decoded_dataset(self._ids[pos], self._paths.take(pa.array(pos, pa.int64())), skip_unreadable,
                                self.origin)
