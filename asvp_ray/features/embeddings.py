"""Feature version v0 from a bring-your-own-embeddings pool, written by Ray Data tasks.

The tasks read the embeddings' Parquet files (local or a URI, through ``pyarrow.fs``), check each
batch (same length, no empty or non-finite feature) and write it as one feature-store part
(``store.write_part``) into the version's partial folder (or its prefix on an object store: the
``storage`` key); the caller gets only the parts' records,
so no process holds more than a part of the pool (the driver of a 1,000,000 x 512 pool peaked at
+2.5 GB when it streamed the rows through itself).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np
import pyarrow as pa

from asvp_ray.runtime.ray_utils import asvp_errors_unwrapped
from asvp_ray.runtime.resources import check_nested

log = logging.getLogger(__name__)

# Each read task (the write is fused into it) reserves one CPU: measured on 1,000,000 x 512 with
# 4 logical CPUs on 2 cores, 0.5 CPU a task took 35 s, 1 CPU 18 s, 2 CPUs 22 s.
TASK_CPUS = 1.0


def _write_embedding_parts(table: pa.Table, folder: str, dim: Optional[int], origin: str,
                           part_rows: int) -> Dict[str, np.ndarray]:
    """Ray Data task (fused with the read): check a block of embeddings and write it as parts of
    up to ``part_rows`` rows; returns their records."""
    from asvp_ray.data.embeddings import embedding_rows
    from asvp_ray.features.parts import write_part

    recs = []
    for start in range(0, table.num_rows, part_rows):
        ids, feats = embedding_rows(table.slice(start, part_rows), dim, origin)
        recs.append(write_part(folder, ids, feats))
    keys = ("file", "rows", "dim", "bytes", "sha256", "min_id")
    return {k: np.array([r[k] for r in recs], dtype=object if k in ("file", "sha256") else np.int64) for k in keys}


def write_embedding_parts(source, folder: str, part_rows: int,
                          on_rows: Optional[Callable[[int], None]] = None) -> Iterator[Dict[str, Any]]:
    """Write an ``EmbeddingsSource``'s rows into ``folder`` (a version's split folder, on storage
    every node sees) as Parquet parts of up to ``part_rows`` rows, from Ray Data tasks.

    Yields:
        each part's record (``store.write_part``: file, rows, dim, bytes, sha256, min_id).

    Raises:
        BadInputError: a row with no feature, features of different lengths, NaN or infinity
            (naming the ids and the embeddings' path).
    """
    import ray.data

    from asvp_ray.runtime.placement import apply_to_ray_data

    check_nested({"CPU": TASK_CPUS}, "the embeddings import's read tasks", "ray start --num-cpus (more CPUs)")
    apply_to_ray_data()  # the read and write tasks stay off GPU nodes
    fs, files = source.files()
    # select_columns is pushed down into the read: the other columns are never read
    ds = ray.data.read_parquet(files, filesystem=fs, num_cpus=TASK_CPUS).select_columns(["id", "feature"])
    # batch_size=None: one call per read block, so the write fuses into the read task (no block
    # crosses the object store); the task cuts its block into parts itself
    ds = ds.map_batches(_write_embedding_parts, fn_kwargs={"folder": str(folder), "dim": source.dim,
                                                           "origin": source.path, "part_rows": int(part_rows)},
                        batch_size=None, batch_format="pyarrow", num_cpus=TASK_CPUS)
    with asvp_errors_unwrapped():
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for k in range(len(batch["file"])):
                rec = {key: batch[key][k] for key in ("file", "rows", "dim", "bytes", "sha256", "min_id")}
                rec = {key: (str(v) if key in ("file", "sha256") else int(v)) for key, v in rec.items()}
                if on_rows is not None:
                    on_rows(rec["rows"])
                yield rec
