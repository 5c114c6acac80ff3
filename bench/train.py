"""Fine-tuning throughput: Ray Train (1 and 2 DDP workers) versus a plain PyTorch loop.

All three train the same model (``build_classifier``: backbone + linear head) with the same
batch size, optimizer (the FT recipe: SGD, backbone/head learning rates), augmentation
(timm random resized crop + flip) and Fashion-MNIST images, on this machine. Throughput is
training images per second, forward + backward + step, per epoch (the first epoch is a warm-up
and not counted); for Ray it comes from the workers' own per-epoch timing, summed over ranks, so
Ray's start-up (worker processes, process group) is reported apart as "wall". The best epoch and
the median epoch are both reported: on a machine shared with other jobs the best is the steadier
estimate of what the code can do, and ratios are taken on it. ``--rounds`` repeats the three
settings in turn so that bursts of outside load spread over all of them.

Every process uses ``--threads`` intra-op threads (default 1): the plain loop, one Ray worker,
and each of two Ray workers (which then need twice the CPUs; the ideal ratio is 2). One thread per
process is the default because on a shared, oversubscribed machine multi-threaded PyTorch can
spin-wait and lose an order of magnitude. Goal: one Ray worker within 10% of the plain loop.

Usage::

    .venv/bin/python bench/train.py                        # test_efficientnet, 32 px, 1024 images
    .venv/bin/python bench/train.py --model tf_efficientnet_lite0 --weights auto --images 512
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# The repository root replaces this script's folder on the path before anything else is
# imported, so a module here (bench/select.py) cannot shadow the standard library's.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


from asvp_ray.data.fashion_mnist import FashionMNISTSource, read_idx  # noqa: E402
from asvp_ray.features.backbones import BackboneSpec, data_config  # noqa: E402
from asvp_ray.train.config import TrainConfig  # noqa: E402
from asvp_ray.train.dataset import Collate  # noqa: E402
from asvp_ray.train.finetune import _optimizer, _set_mode, _train_epoch, build_classifier, finetune  # noqa: E402


def plain_loop(spec: BackboneSpec, images: np.ndarray, labels: np.ndarray, cfg: TrainConfig, threads: int,
               epochs: int) -> list:
    """Images/s of each epoch of a single-process loop (no Ray, no DDP)."""
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    model = build_classifier(spec, 10, seed=cfg.seed)
    dcfg = data_config(spec, model.backbone)
    ids = np.arange(len(labels), dtype=np.int64)
    opt, _ = _optimizer(model, "ft", cfg, epochs)
    _set_mode(model, "ft")
    device = torch.device("cpu")
    rng = np.random.default_rng(cfg.seed)
    rates = []
    for epoch in range(epochs):
        # The workers' batch function (augmentation included) on in-memory batches: what a loop
        # without Ray does per batch, with no reading or shuffling machinery around it.
        collate = Collate(dcfg, cfg.augment, cfg.crop_scale, seed=epoch)
        order = rng.permutation(len(labels))
        loader = (collate({"id": ids[b], "image": images[b], "label": labels[b]})
                  for b in (order[s:s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size)))
        t0 = time.perf_counter()
        sums = _train_epoch(model, loader, opt, device, amp=False)
        rates.append(int(sums["seen"]) / (time.perf_counter() - t0))
    return rates


def ray_run(spec: BackboneSpec, pool: FashionMNISTSource, cfg: TrainConfig, out: str) -> tuple:
    """(images/s of each epoch, wall seconds of the whole ``finetune`` call)."""
    t0 = time.perf_counter()
    res = finetune(pool, pool.ids, None, 10, spec, cfg, out, method="ft")
    return [h["images_per_s"] for h in res.history], time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="test_efficientnet")
    ap.add_argument("--weights", default="none", help="none (random init), auto, hub or a path")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=1024, help="labelled images (Fashion-MNIST train)")
    ap.add_argument("--batch-size", type=int, default=64, help="per worker")
    ap.add_argument("--epochs", type=int, default=6, help="epochs per run; the first is warm-up")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process (plain loop, each worker)")
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (plain, 1 worker, 2 workers)")
    args = ap.parse_args(argv)
    if args.epochs < 2:
        ap.error("--epochs must be >= 2 (the first is warm-up)")

    spec = BackboneSpec(args.model, weights=args.weights, image_size=args.image_size, crop_pct=1.0)
    pool = FashionMNISTSource(split="train", limit=args.images)
    images = read_idx(pool.images_path)[:len(pool)]
    base = dict(epochs=args.epochs, batch_size=args.batch_size, augment=not args.no_augment, amp=False,
                max_failures=0, checkpoint_every=args.epochs)
    T = args.threads
    timed = slice(1, None)
    print(f"model {args.model} ({args.weights}), {args.image_size}px, {len(pool)} images, batch {args.batch_size}"
          f"/worker, {args.epochs - 1} timed epochs, {T} thread(s) per process, augment={not args.no_augment}, "
          f"{os.cpu_count()} CPUs on this machine")

    from asvp_ray.runtime.ray_utils import init_ray

    init_ray(num_cpus=max(2 * T, os.cpu_count() or 1))
    # Rounds alternate the settings, so a burst of load from other jobs on a shared machine
    # hits each of them rather than one; every epoch of every round is kept.
    names = ["plain PyTorch loop", "Ray Train, 1 worker", "Ray Train, 2 workers"]
    rates = {n: [] for n in names}
    walls = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            rates[names[0]] += plain_loop(spec, images, pool.labels, TrainConfig(**base), T, args.epochs)[timed]
            for workers in (1, 2):
                cfg = TrainConfig(**base, num_workers=workers, cpus_per_worker=T)
                got, wall = ray_run(spec, pool, cfg, os.path.join(tmp, f"r{r}w{workers}"))
                rates[names[workers]] += got[timed]
                walls[names[workers]].append(wall)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} best {max(rates[n]):.0f}" for n in names))
    rows = [(n, w, T, rates[n], (statistics.median(walls[n]) if walls[n] else None))
            for n, w in zip(names, (1, 1, 2))]
    ref = max(rows[0][3])
    print(f"\n{'setting':28s} {'workers':>7s} {'thr/wkr':>7s} {'best img/s':>10s} {'median':>8s} "
          f"{'best/plain':>10s} {'wall s':>7s}")
    for name, w, thr, per_epoch, wall in rows:
        best, med = max(per_epoch), statistics.median(per_epoch)
        print(f"{name:28s} {w:7d} {thr:7d} {best:10.1f} {med:8.1f} {best / ref:10.3f} "
              f"{'' if wall is None else f'{wall:7.1f}'}")
    print(f"\nplain reference = its best epoch = {ref:.1f} images/s; goal: Ray Train with "
          "1 worker >= 0.90 of it (2 workers: ideal 2.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
