"""Fashion-MNIST from its IDX files: find them, fetch them, read them; the pool source over them
(:class:`FashionMNISTSource`, kind ``fashion_mnist``), decoded in Ray Data read tasks.

Where the files come from, in order:
1. a ``root`` given in the config or ``$ASVP_FASHION_MNIST``;
2. Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``), installed
   with apt-get when apt and root are available;
3. a download from the data set's canonical source into ``~/.cache/asvp-ray/fashion-mnist``,
   each file checked against its SHA-256.

Run ``python -m asvp_ray.data.fashion_mnist ensure`` to make sure the files are present.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from asvp_ray.core.errors import BadInputError
from asvp_ray.data.base import ROWS_PER_BLOCK, PoolSource, id_positions

log = logging.getLogger(__name__)

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "asvp-ray" / "fashion-mnist"
CANONICAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# SHA-256 of the original gzip files (identical in Debian's package and the canonical source).
FILES = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def _complete(root: Path) -> bool:
    return all((root / name).is_file() for name in FILES)


def find_root(root: Optional[str] = None) -> Path:
    """The folder holding the four IDX files.

    Raises:
        BadInputError: no folder has them; the message says how to get them.
    """
    candidates = [Path(root)] if root else []
    if not root:
        if os.environ.get("ASVP_FASHION_MNIST"):
            candidates.append(Path(os.environ["ASVP_FASHION_MNIST"]))
        candidates += [DEBIAN_ROOT, CACHE_ROOT]
    for c in candidates:
        if _complete(c):
            return c
    where = ", ".join(str(c) for c in candidates)
    raise BadInputError(
        f"Fashion-MNIST IDX files ({', '.join(FILES)}) not found in {where}. "
        "Fix: run `python -m asvp_ray.data.fashion_mnist ensure` (apt-get install dataset-fashion-mnist "
        "or a verified download), or set data.pool.root to the folder that holds them."
    )


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _try_apt() -> bool:
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"],
                ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if cmd[1] == "install" and r.returncode == 0 and _complete(DEBIAN_ROOT):
            return True
    return _complete(DEBIAN_ROOT)


def download(dest: Path = CACHE_ROOT, base_url: str = CANONICAL_URL) -> Path:
    """Download the four files into ``dest``, verifying each SHA-256 before it is kept."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, digest in FILES.items():
        target = dest / name
        if target.is_file() and sha256(target) == digest:
            continue
        with tempfile.NamedTemporaryFile(dir=dest, delete=False) as tmp:
            log.info("downloading %s%s", base_url, name)
            with urllib.request.urlopen(base_url + name, timeout=60) as r:
                shutil.copyfileobj(r, tmp)
        got = sha256(Path(tmp.name))
        if got != digest:
            os.unlink(tmp.name)
            raise BadInputError(f"download of {name} has SHA-256 {got}, expected {digest}; try again later")
        os.replace(tmp.name, target)
    return dest


def ensure(root: Optional[str] = None) -> Path:
    """Make sure the files are present and return their folder (apt, then download)."""
    try:
        return find_root(root)
    except BadInputError:
        pass
    if root is None or Path(root) == DEBIAN_ROOT:
        if _try_apt():
            return DEBIAN_ROOT
    return download(Path(root) if root and Path(root) != DEBIAN_ROOT else CACHE_ROOT)


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx_header(path: Path) -> Tuple[int, Tuple[int, ...], int]:
    """(dtype code, shape, header bytes) of an IDX file.

    Raises:
        BadInputError: the file is not an IDX file.
    """
    with _open(path) as f:
        head = f.read(4)
        if len(head) != 4 or head[0] != 0 or head[1] != 0:
            raise BadInputError(f"{path}: not an IDX file (bad magic {head!r}); re-fetch the data set")
        ndim = head[3]
        dims = np.frombuffer(f.read(4 * ndim), dtype=">u4")
        return head[2], tuple(int(d) for d in dims), 4 + 4 * ndim


def read_idx(path: Path, rows: Optional[np.ndarray] = None) -> np.ndarray:
    """Read an uint8 IDX file (images N x 28 x 28 or labels N), optionally only ``rows``."""
    code, shape, offset = read_idx_header(path)
    if code != 0x08:
        raise BadInputError(f"{path}: IDX dtype code {code:#x} is not uint8")
    with _open(path) as f:
        raw = f.read()
    n_expected = int(np.prod(shape))
    if len(raw) - offset != n_expected:
        raise BadInputError(
            f"{path}: truncated or corrupt ({len(raw) - offset} data bytes, expected {n_expected}); re-fetch the file"
        )
    arr = np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)
    return arr if rows is None else arr[rows]


def split_paths(root: Path, split: str) -> Tuple[Path, Path]:
    prefix = SPLIT_PREFIX[split]
    return root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"


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
        if split not in SPLIT_PREFIX:
            raise BadInputError(f"fashion_mnist split {split!r} is not one of train, test")
        self.root = find_root(root)
        self.split = split
        self.images_path, self.labels_path = split_paths(self.root, split)
        _, shape, _ = read_idx_header(self.images_path)
        n = shape[0] if limit is None else min(int(limit), shape[0])
        if n <= 0:
            raise BadInputError(f"fashion_mnist limit={limit} leaves no samples; use a positive limit")
        self._ids = np.arange(n, dtype=np.int64)
        self._labels = read_idx(self.labels_path)[:n].astype(np.int64)
        self.limit = limit

    @property
    def ids(self) -> np.ndarray:
        return self._ids

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def classes(self) -> List[str]:
        return list(CLASSES)

    def paths(self, ids: Sequence[int]) -> List[str]:
        return [f"{self.images_path}#{int(i)}" for i in ids]

    def to_dataset(self, ids=None, skip_unreadable=False):
        import ray.data

        pos = id_positions(self._ids, ids)
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

                        imgs = read_idx(Path(path), p)
                        for s in range(0, len(i), ROWS_PER_BLOCK):
                            sl = slice(s, s + ROWS_PER_BLOCK)
                            yield BlockAccessor.batch_to_block(
                                {"id": i[sl], "image": imgs[sl], "error": np.array([""] * len(i[sl]), dtype=object)})

                    tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
                return tasks

        return IDXDatasource()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m asvp_ray.data.fashion_mnist",
                                description="Make sure the Fashion-MNIST IDX files are present.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("ensure", help="find, apt-get install, or download (SHA-256 checked) the files")
    e.add_argument("--root", default=None, help="folder to look in / download into")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = ensure(args.root)
    for name, digest in FILES.items():
        if sha256(root / name) != digest:
            print(f"error: {root / name} fails its SHA-256 check; delete it and rerun", file=sys.stderr)
            return 1
    print(f"Fashion-MNIST ready in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
