"""The labelled set as the fine-tune's workers read it: Ray Data in, torch batches out.

The labelled ids (and the eval set) become Ray Datasets of the pool source
(``source.to_dataset(ids=...)``); Ray Data tasks decode them and attach the labels by id, and the datasets are materialized into the object store *before* the
worker group starts, while the CPUs the workers will take are still free. The calling process
(the driver) holds block references only, never an image array, so its memory does not grow with
the labelled set. The trainer gets them as ``datasets={"train", "eval"}``: each rank iterates
its shard (``get_dataset_shard("train").iter_torch_batches``; equal shards, so DDP ranks step
together; the eval set is split without dropping rows), shuffled per epoch by a seeded local
shuffle over the whole shard. Reading materialized blocks needs no Ray Data task, so workers that
take every CPU (two 1-CPU workers on a 2-CPU machine) cannot starve their own input; the read
tasks need one CPU before training, inside what the Train phase reserves anyway
(``asvp_ray.tune.resources``). Ray Data's prefetch threads in the worker collate the next
batches while one trains: augmentation (random resized crop, flip) or the eval preprocessing on
CPU workers; on GPU workers un-augmented batches (and the eval set) travel as uint8 from pinned
memory and are resized and normalised on the device, and augmentation runs in
``train.loader_workers`` prefetch threads. Images keep their decoded size in the object store
(a resize there would change the crops augmentation draws and round what the eval
preprocessing computes in float).

Augmentation is seeded (``Collate``: by the epoch's seed and the batch's first id), never by global
random state. The train loop is :mod:`asvp_ray.train.finetune`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from asvp_ray.core.errors import BadInputError
from asvp_ray.features.backbones import Preprocessor


def with_labels(batch: Dict[str, np.ndarray], ids: np.ndarray, labels: np.ndarray) -> Dict[str, np.ndarray]:
    """A decoded source batch -> ``{"id", "image", "label"}``, the labels looked up by id.

    Runs in Ray Data tasks. ``ids`` (sorted int64) and ``labels`` (aligned) travel by value: a
    few bytes per labelled image.
    """
    got = np.asarray(batch["id"], dtype=np.int64)
    pos = np.minimum(np.searchsorted(ids, got), len(ids) - 1)
    bad = ids[pos] != got
    if bad.any():
        raise BadInputError(f"the source returned other ids than asked for, e.g. {got[bad][:5].tolist()}")
    return {"id": got, "image": batch["image"], "label": labels[pos]}


def labelled_dataset(source, ids: np.ndarray, labels: np.ndarray, what: str):
    """The images of ``ids`` with their ``labels``, decoded by Ray Data tasks into the object store.

    The dataset is materialized (in source order, so a seed gives the same epochs every time)
    before the Ray Train workers start: the read and decode tasks run while the workers' CPUs
    are still free, and the driver holds only block references. Training then reads the blocks
    and needs no Ray Data task, so workers that take every CPU cannot starve their own input.

    Returns:
        a ``MaterializedDataset`` with columns ``id`` (int64), ``image`` (uint8 HxW[xC]) and
        ``label`` (int64).

    Raises:
        BadInputError: the source returned fewer or other images than ``ids``.
    """
    from asvp_ray.runtime.placement import apply_to_ray_data

    apply_to_ray_data()  # reading and decoding the labelled images stays off GPU nodes
    order = np.argsort(ids, kind="stable")
    ds = source.to_dataset(ids=ids).map_batches(
        with_labels, fn_kwargs={"ids": ids[order], "labels": labels[order]}, batch_size=None,
        batch_format="numpy")
    ds.context.execution_options.preserve_order = True  # block order = source order, not completion order
    ds = ds.materialize()
    n = ds.count()
    if n != len(ids):
        raise BadInputError(f"{what}: the source returned {n} images for {len(ids)} ids; some ids are missing")
    return ds


def ingest_config():
    """Ray Train's ``DataConfig``: the training set split in equal shards (DDP ranks must step
    the same number of times), the eval set split without dropping rows (ranks sum their counts)."""
    from ray.train import DataConfig

    class _Ingest(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            if set(datasets) != {"eval"}:
                return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
            ds = datasets["eval"].copy(datasets["eval"])
            ds.context.execution_options = self._resolve_execution_options("eval")
            hints = worker_node_ids if self._enable_shard_locality else None
            return [{"eval": split} for split in ds.streaming_split(world_size, equal=False, locality_hints=hints)]

    return _Ingest()


def crop_box(rng: np.random.Generator, w: int, h: int, scale: Tuple[float, float],
              ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """A random resized crop's box (left, top, right, bottom): timm's and torchvision's rule (area
    in ``scale``, log-uniform aspect ratio, ten tries, then the centre crop of the clamped ratio)."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return left, top, left + cw, top + ch
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        cw, ch = int(round(h * max(ratio))), h
    else:
        cw, ch = w, h
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


class Collate(NumpyBatchCollateFn):
    """A numpy batch ``{"id", "image", "label"}`` -> (images (B,3,S,S) float, labels int64 (B,)).

    With augmentation: a random resized crop and a horizontal flip per image (grayscale turned
    into RGB first), then normalised. The random numbers come from a generator seeded by
    ``seed`` and the batch's first id, never from global state: Ray Data calls this in its
    prefetch threads, and the same seed gives the same batches however the threads interleave.
    Without augmentation: the eval ``Preprocessor``, or with ``raw_uint8`` (GPU workers,
    same-size images) the uint8 images themselves, which the worker preprocesses on its device.

    Args:
        dcfg: the backbone's data config (input size, mean, std, interpolation).
        augment: draw random crops and flips.
        crop_scale: the crop's area range.
        raw_uint8: return un-augmented same-size batches as uint8.
        seed: this epoch's (and rank's) augmentation seed.
    """

    def __init__(self, dcfg: Dict[str, Any], augment: bool, crop_scale: Tuple[float, float],
                 raw_uint8: bool = False, seed: int = 0):
        super().__init__()
        self.pre = Preprocessor(dcfg)
        self.size = int(dcfg["input_size"][-1])
        self.augment, self.crop_scale = bool(augment), tuple(crop_scale)
        self.raw_uint8 = bool(raw_uint8 and not augment)
        self.seed = int(seed)
        self.resample = {"bicubic": 3, "nearest": 0}.get(dcfg.get("interpolation", "bilinear"), 2)
        self.mean = torch.tensor(dcfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(dcfg["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def _augmented(self, images, first_id: int) -> torch.Tensor:
        from PIL import Image

        rng = np.random.default_rng([self.seed & 0xFFFF_FFFF, int(first_id) & 0x7FFF_FFFF_FFFF_FFFF])
        out = np.empty((len(images), self.size, self.size, 3), dtype=np.uint8)
        for k, im in enumerate(images):
            img = Image.fromarray(np.asarray(im)).convert("RGB")
            box = crop_box(rng, img.width, img.height, self.crop_scale)
            img = img.resize((self.size, self.size), resample=self.resample, box=box)
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            out[k] = np.asarray(img)
        x = torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0)
        return ((x - self.mean) / self.std).contiguous()

    def __call__(self, batch: Dict[str, np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
        images = batch["image"]
        y = torch.from_numpy(np.array(batch["label"], dtype=np.int64))  # a writable copy
        if self.augment:
            return self._augmented(images, int(batch["id"][0]) if len(y) else 0), y
        if self.raw_uint8 and isinstance(images, np.ndarray) and images.dtype == np.uint8:
            return torch.from_numpy(np.ascontiguousarray(images)), y
        return self.pre(images), y


def check_labels(labels, n: int, num_classes: int, what: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,):
        raise BadInputError(f"{what}: {y.shape[0] if y.ndim else 0} labels for {n} ids; give one label per id")
    if not np.issubdtype(y.dtype, np.integer):
        raise BadInputError(f"{what}: labels must be integer class indices, got dtype {y.dtype}")
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        raise BadInputError(f"{what}: labels {np.unique(y[bad])[:10].tolist()} are outside 0..{num_classes - 1}; "
                            f"fix the labels or num_classes ({num_classes})")
    return y.astype(np.int64)
