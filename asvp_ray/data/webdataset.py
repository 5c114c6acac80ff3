"""WebDataset tar shards as a pool (``data.pool.kind: webdataset``).

A shard is a tar file whose members are grouped into samples by key: ``KEY.EXT`` (the key is the
member's path up to the first dot of its file name, WebDataset's rule), the members of one key
adjacent. Each sample needs an image member (``jpg``, ``png``, ...); its id comes from
``data.pool.id`` (``__key__``: the key, an integer; ``json.FIELD``: a field of the ``json``
member; ``EXT``: the text of that member) or, with ``hash_ids``, a stable hash of that value; its
label from ``data.pool.label`` (``cls``, ``txt``, ``json.FIELD``; unset: ``cls`` where present).

The index (:mod:`asvp_ray.data.indexed`) holds each image member's shard, data offset and size,
read with Python's ``tarfile`` from one sequential read of each shard (the ``wids`` package
indexes the same way, but on local copies of whole shards; here shards stay in the bucket and
images are read by byte ranges). The whole pool is read by Ray Data's ``read_webdataset``, one
task per shard on any node.
"""
from __future__ import annotations

import json
import re
import tarfile
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa

from asvp_ray.core.errors import BadInputError, ConfigError
from asvp_ray.data.indexed import INDEX_SCHEMA, IndexedSource, decoded_rows, file_uri, id_from_text
from asvp_ray.data.locate import fs_and_path, open_fs

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff", "gif")
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's (and Ray's) key / extension split
# ranges in one shard closer than this are read in one request; no request reads more than _RANGE_MAX
_RANGE_GAP = 256 << 10
_RANGE_MAX = 64 << 20
STREAM_BUFFER = 8 << 20  # a shard read whole (index, read_webdataset) is read in requests of this size


def split_name(name: str):
    """``(key, extension)`` of a member name, as WebDataset splits it (``(None, None)``: no extension)."""
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)


def field_value(rule: str, key: str, members: Dict[str, bytes]) -> Any:
    """The value ``rule`` names in one sample: ``__key__``, ``json.FIELD`` or a member's text; None
    when the sample has no such member or field."""
    if rule == "__key__":
        return key
    if rule.startswith("json."):
        raw = members.get("json")
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise BadInputError(f"member {key}.json is not JSON ({e})") from None
        for part in rule[5:].split("."):
            doc = doc.get(part) if isinstance(doc, dict) else None
        return doc
    raw = members.get(rule)
    return None if raw is None else raw.decode("utf-8", "replace").strip()


def _needed_members(opts: Dict[str, Any]) -> List[str]:
    out = []
    for rule in (opts["id"], opts["label"] or "cls"):
        if rule == "__key__":
            continue
        out.append("json" if rule.startswith("json.") else rule)
    return out


def index_shard(uri: str, file_no: int, opts: Dict[str, Any]) -> pa.Table:
    """One shard's index rows, from one sequential read (a Ray task).

    Raises:
        BadInputError: a truncated or corrupt tar, a sample without an image member, keys not
            adjacent, an id that is not an integer; each naming the shard and the member.
    """
    fs, path = fs_and_path(uri)
    shown = path
    needed = set(_needed_members(opts))
    image_exts: Sequence[str] = opts["image"]
    rows: Dict[str, list] = {n: [] for n in INDEX_SCHEMA.names}
    done_keys = set()
    cur_key: Optional[str] = None
    cur: Dict[str, Any] = {}
    last = "(start of the shard)"

    def flush():
        if cur_key is None:
            return
        img = next((e for e in image_exts if e in cur["_at"]), None)
        if img is None:
            raise BadInputError(f"webdataset shard {shown}: sample {cur_key!r} has no image member (it has "
                                f"{sorted(cur['_at']) or 'none'}; looked for {', '.join(image_exts)}); set "
                                "data.pool.image to its image extension, or remove the sample")
        off, size = cur["_at"][img]
        where = lambda: f"webdataset shard {shown}, sample {cur_key!r}"  # noqa: E731
        raw_id = field_value(opts["id"], cur_key, cur["_data"])
        if raw_id is None:
            raise BadInputError(f"{where()}: no {opts['id']} for the id; give every sample one or change data.pool.id")
        rows["id"].append(id_from_text(raw_id, opts["hash_ids"], where, opts["id"]))
        rows["file"].append(file_no)
        rows["loc_a"].append(off)
        rows["loc_b"].append(size)
        rows["key"].append(f"{cur_key}.{img}")
        lab = field_value(opts["label"] or "cls", cur_key, cur["_data"])
        rows["label_raw"].append(None if lab is None or lab == "" else str(lab))

    try:
        # buffered: tarfile reads 10 KiB at a time, which on an object store is a ranged GET each
        with fs.open_input_stream(path, buffer_size=STREAM_BUFFER) as raw:
            tf = tarfile.open(fileobj=raw, mode="r|")
            for ti in tf:
                if not ti.isreg():
                    continue
                last = ti.name
                key, ext = split_name(ti.name)
                if key is None:
                    continue
                if key != cur_key:
                    flush()
                    if key in done_keys:
                        raise BadInputError(f"webdataset shard {shown}: the members of sample {key!r} are not "
                                            f"adjacent (again at {ti.name!r}); WebDataset needs a sample's members "
                                            "together: rewrite the shard with its members sorted by name")
                    if cur_key is not None:
                        done_keys.add(cur_key)
                    cur_key, cur = key, {"_at": {}, "_data": {}}
                cur["_at"][ext] = (ti.offset_data, ti.size)
                if ext in needed:
                    cur["_data"][ext] = tf.extractfile(ti).read()
            flush()
    except (tarfile.TarError, EOFError) as e:
        raise BadInputError(f"webdataset shard {shown}: truncated or corrupt tar after member {last!r} ({e}); "
                            "restore or rewrite the shard, or remove it from data.pool.shards") from None
    except FileNotFoundError:
        raise BadInputError(f"webdataset shard {shown} is missing; restore it or remove it from "
                            "data.pool.shards") from None
    return pa.table(rows, schema=INDEX_SCHEMA)


def _ranges(offsets: np.ndarray, sizes: np.ndarray):
    """Coalesced ``(start, end, [row positions])`` for rows sorted by offset."""
    out = []
    for k, (o, s) in enumerate(zip(offsets.tolist(), sizes.tolist())):
        if out and o - out[-1][1] <= _RANGE_GAP and o + s - out[-1][0] <= _RANGE_MAX:
            out[-1][1] = max(out[-1][1], o + s)
            out[-1][2].append(k)
        else:
            out.append([o, o + s, [k]])
    return out


_POOL = None


def read_ranges(batch: Dict[str, np.ndarray], files: Dict[str, Any], skip_unreadable: bool, origin: str,
                options: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """A block of index rows (``id``, ``file``, ``loc_a`` offset, ``loc_b`` size) read by byte ranges
    and decoded, in the block's order (a Ray Data task). Members of one shard closer than
    ``_RANGE_GAP`` are read in one request; requests run 16 at a time."""
    global _POOL
    ids = np.asarray(batch["id"], dtype=np.int64)
    fno = np.asarray(batch["file"])
    off = np.asarray(batch["loc_a"], dtype=np.int64)
    size = np.asarray(batch["loc_b"], dtype=np.int64)
    blobs: List[Any] = [None] * len(ids)
    jobs = []
    for f in np.unique(fno):
        rows = np.flatnonzero(fno == f)
        rows = rows[np.argsort(off[rows], kind="stable")]
        for start, end, ks in _ranges(off[rows], size[rows]):
            jobs.append((int(f), start, end, rows[ks]))

    def fetch(job):
        f, start, end, rows_ = job
        uri = file_uri(files, f)
        try:
            fs, path = fs_and_path(uri)
            with fs.open_input_file(path) as fh:
                data = fh.read_at(end - start, start)
            for r in rows_:
                a = int(off[r]) - start
                piece = data[a:a + int(size[r])]
                if len(piece) != int(size[r]):
                    raise EOFError(f"shard ends at byte {start + len(data)}, member ends at {int(off[r] + size[r])}")
                blobs[r] = piece
        except Exception as e:  # noqa: BLE001 - reported per image
            for r in rows_:
                blobs[r] = e

    if len(jobs) > 1:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(16, thread_name_prefix="asvp-ranges")
        list(_POOL.map(fetch, jobs))
    else:
        for j in jobs:
            fetch(j)
    where = [f"shard {files['paths'][int(f)]}, member at byte {int(o)}" for f, o in zip(fno, off)]
    return decoded_rows(ids.tolist(), blobs, where, skip_unreadable, origin)


def decode_samples(batch: Dict[str, Any], options: Dict[str, Any], skip_unreadable: bool, origin: str):
    """``read_webdataset``'s rows (``__key__``, ``__url__``, one column per member, raw bytes) as
    ``id``, ``image``, ``error``, with the index's id rule (a Ray Data task)."""
    keys = [str(k) for k in batch["__key__"]]
    urls = [str(u) for u in batch["__url__"]]
    members = [c for c in batch if not c.startswith("__")]
    ids, blobs, where = [], [], []
    for r, key in enumerate(keys):
        sample = {m: batch[m][r] for m in members if isinstance(batch[m][r], (bytes, bytearray))}
        w = f"shard {urls[r]}, sample {key!r}"
        img = next((e for e in options["image"] if e in sample), None)
        ids.append(id_from_text(field_value(options["id"], key, sample), options["hash_ids"],
                                lambda: f"webdataset {w}", options["id"]))
        blobs.append(sample[img] if img else BadInputError(f"no image member ({', '.join(options['image'])})"))
        where.append(w + (f", member {key}.{img}" if img else ""))
    return decoded_rows(ids, blobs, where, skip_unreadable, origin)


class WebDatasetSource(IndexedSource):
    """WebDataset tar shards (see the module).

    Args:
        shards: a folder (its ``*.tar`` files), a glob, a brace pattern
            (``s3://b/shard-{000000..000999}.tar``) or a list of these; local or at URIs.
        id: ``__key__`` (default), ``json.FIELD`` or a member extension (``id``, ``txt``).
        hash_ids: number images by a 63-bit hash of the id value (for keys that are not integers).
        image: member extensions of the image, first present wins (default: common image types).
        label: ``cls``, ``txt``, ``json.FIELD``, or None (``cls`` where present).
        classes: class names (index = label).
        index_dir: where the index is kept (the run's ``index/``); None: built, not kept.
    """

    kind = "webdataset"
    file_kind = "shard"
    suffixes = (".tar",)
    files_key = "data.pool.shards"

    @classmethod
    def from_config(cls, cfg, classes: Optional[List[str]] = None, index_dir=None) -> "WebDatasetSource":
        """The source a ``SourceConfig`` of this kind describes (it needs ``shards``)."""
        if not cfg.shards:
            raise ConfigError("data source kind webdataset needs shards: a folder of .tar shards, a glob, a brace "
                              "pattern such as shards/shard-{000000..000099}.tar, or a list")
        return cls(cfg.shards, id=cfg.id or "__key__", hash_ids=cfg.hash_ids, image=cfg.image, label=cfg.label,
                   classes=classes, index_dir=index_dir)

    def __init__(self, shards, id: str = "__key__", hash_ids: bool = False, image: Optional[str] = None,
                 label: Optional[str] = None, classes: Optional[List[str]] = None, index_dir=None):
        exts = [e.strip().lstrip(".").lower() for e in (image or "").replace(",", ";").split(";") if e.strip()]
        self.opts = {"id": id, "hash_ids": bool(hash_ids), "image": exts or list(IMAGE_MEMBERS), "label": label}
        for name, rule in (("id", id), ("label", label)):
            if rule is not None and (not rule or rule.endswith(".") or " " in rule):
                raise ConfigError(f"data.pool.{name} {rule!r} is not a field: use __key__, json.FIELD or a member "
                                  "extension such as cls")
        super().__init__(shards, classes=classes, index_dir=index_dir)

    def _options(self):
        return self.opts

    def _index_task(self) -> Callable[..., pa.Table]:
        return index_shard

    def _label_name(self) -> str:
        return f"member {self.opts['label'] or 'cls'}"

    def _subset_reader(self):
        return read_ranges

    def _full_dataset(self, skip_unreadable: bool):
        import ray.data

        wanted = set(self.opts["image"]) | set(_needed_members({**self.opts, "label": "__key__"}))
        return ray.data.read_webdataset(
            self.located.paths, filesystem=open_fs(self.located.where()), decoder=None,
            suffixes=sorted(wanted), file_extensions=None, arrow_open_stream_args={"buffer_size": STREAM_BUFFER},
        ).map_batches(decode_samples, fn_kwargs={"options": self.opts, "skip_unreadable": skip_unreadable,
                                                  "origin": self.origin},
                      batch_size=None, batch_format="numpy")
