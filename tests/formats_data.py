"""Small pools written three ways for the format tests and bench/formats.py: an image folder
(class subfolders of PNG files), WebDataset tar shards (``KEY.png``, ``KEY.cls``, ``KEY.json``
with the id) and Parquet files (id, Hugging Face style ``image: {bytes, path}``, label): the same
images under the same ids (the image folder's path hashes)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from asvp_ray.data.files import path_id


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(img, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def samples_from_fashion_mnist(n: int, classes: Sequence[str], offset: int = 0) -> List[Tuple[int, str, bytes, int]]:
    """``(id, relative path, PNG bytes, label)`` of the first ``n`` Fashion-MNIST training images
    from ``offset``; ids are the image folder's (``path_id`` of ``CLASS/NNNNN.png``)."""
    from asvp_ray.data.fashion_mnist import FashionMNISTSource, read_idx

    src = FashionMNISTSource(split="train")
    pos = np.arange(offset, offset + n)
    images = read_idx(Path(src.images_path), pos)
    out = []
    for p, img in zip(pos, images):
        label = int(src.labels[p])
        rel = f"{classes[label]}/{int(p):05d}.png"
        out.append((path_id(rel), rel, png_bytes(img), label))
    return out


def write_image_folder(samples, root: Path) -> Path:
    for _, rel, data, _ in samples:
        f = Path(root) / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
    return Path(root)


def tar_bytes(members: Sequence[Tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 0
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def webdataset_shards(samples, per_shard: int) -> List[bytes]:
    """Tar shards of ``per_shard`` samples: ``KEY.png``, ``KEY.cls`` (label), ``KEY.json`` ({"id": ...})."""
    shards = []
    for s in range(0, len(samples), per_shard):
        members = []
        for k, (i, rel, data, label) in enumerate(samples[s:s + per_shard]):
            key = f"{s + k:09d}"
            members += [(f"{key}.cls", str(label).encode()), (f"{key}.json", json.dumps({"id": i, "path": rel}).encode()),
                        (f"{key}.png", data)]
        shards.append(tar_bytes(members))
    return shards


def write_webdataset(samples, folder: Path, per_shard: int) -> List[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, data in enumerate(webdataset_shards(samples, per_shard)):
        p = folder / f"shard-{k:06d}.tar"
        p.write_bytes(data)
        out.append(p)
    return out


def parquet_tables(samples, per_file: int, rows_per_group: int = 256) -> List[bytes]:
    """Parquet files of ``per_file`` rows: id, image {bytes, path} (Hugging Face's layout), label."""
    out = []
    for s in range(0, len(samples), per_file):
        part = samples[s:s + per_file]
        image = pa.array([{"bytes": d, "path": rel} for _, rel, d, _ in part],
                         pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        t = pa.table({"id": pa.array([i for i, *_ in part], pa.int64()), "image": image,
                      "label": pa.array([lab for *_, lab in part], pa.int64())})
        sink = pa.BufferOutputStream()
        pq.write_table(t, sink, row_group_size=rows_per_group)
        out.append(sink.getvalue().to_pybytes())
    return out


def write_parquet_images(samples, folder: Path, per_file: int, rows_per_group: int = 256) -> List[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, data in enumerate(parquet_tables(samples, per_file, rows_per_group)):
        p = folder / f"part-{k:05d}.parquet"
        p.write_bytes(data)
        out.append(p)
    return out
