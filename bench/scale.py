"""End to end at pool scale: `asvp-ray run` on a local two-node Ray cluster, the pool held by
shard actors that load it from the feature store (`pool_shards.mode: shards`).

(a) A seeded ``--rows`` x ``--dim`` embeddings pool (``data.pool.kind: embeddings``, Parquet
    parts of 100,000 rows), ``svpp``, ``--rounds`` rounds of ``--picks`` picks, for each of
    ``--strategies``: per-phase seconds of every round, the driver's peak resident memory above
    its own start-up baseline (summary.json -> driver_memory; goal: under 15% of the pool
    matrix's bytes) and each shard actor's peak (sampled from /proc while the run goes).
(b) ``--check-rows``: the same runs on a smaller pool with the pool in the driver and in shards:
    the labelled ids of every round must be identical.
(c) ``--images N``: a pool of N generated 32x32 grayscale PNG files (10 classes, a Parquet
    manifest with relative paths) through extraction with timm's tiny test model
    (examples/smoke.yaml's backbone), ``asvp`` with one refresh (fine-tune, re-extraction v1),
    three rounds of ``--picks``: per-phase seconds, each feature version's extraction time and
    rate, the driver's peak growth and the shard actors' peaks. ``--rows 0`` skips (a).

On one machine the two "nodes" share its cores: the figures show overhead and memory, not
speed-up.

Usage::

    .venv/bin/python bench/scale.py --rows 1000000 --dim 512 --picks 10000      # (a) + (b)
    .venv/bin/python bench/scale.py --rows 100000 --picks 1000 --check-rows 20000  # minutes
    .venv/bin/python bench/scale.py --rows 0 --check-rows 0 --images 1000000 --picks 10000  # (c)
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).parent / "asvp-ray")
SMOKE = ROOT / "examples" / "smoke.yaml"


def write_pool(folder: Path, rows: int, dim: int, seed: int, start_id: int = 0, part_rows: int = 100_000) -> Path:
    """Clustered, seeded embeddings with labels (64 centres, label = centre % 10), in parts."""
    if (folder / "_done").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    centres = np.random.default_rng(1234).normal(0, 1, (64, dim)).astype(np.float32) * 2
    rng = np.random.default_rng(seed)
    for k, s in enumerate(range(0, rows, part_rows)):
        n = min(part_rows, rows - s)
        c = rng.integers(0, 64, n)
        feats = centres[c] + rng.normal(0, 1, (n, dim)).astype(np.float32)
        col = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1), pa.float32()), dim)
        pq.write_table(pa.table({"id": pa.array(np.arange(start_id + s, start_id + s + n), pa.int64()),
                                 "feature": col, "label": pa.array(c % 10, pa.int64())}), folder / f"part-{k:04d}.parquet")
    (folder / "_done").touch()
    return folder


def _write_images(job):
    folder, ids, seed = job
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32]
    for i in ids:
        c = int(i) % 10  # the class: the direction and frequency of a stripe pattern, plus noise
        angle, freq = c * np.pi / 10, 0.25 + 0.05 * (c % 5)
        img = 128 + 90 * np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 6.3))
        img += rng.normal(0, 25, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(folder / f"{i}.png", compress_level=1)
    return len(ids)


def write_images(folder: Path, n: int, seed: int, start_id: int = 0, per_dir: int = 10_000, procs: int = 2) -> Path:
    """``n`` seeded 32x32 grayscale PNGs of 10 classes in sub-folders of ``per_dir`` files, and
    ``manifest.parquet`` (id, relative path, label); returns the manifest's path."""
    from multiprocessing import Pool

    manifest = folder / "manifest.parquet"
    if (folder / "_done").exists():
        return manifest
    shutil.rmtree(folder, ignore_errors=True)
    jobs = []
    for d, s in enumerate(range(0, n, per_dir)):
        sub = folder / f"d{d:04d}"
        sub.mkdir(parents=True)
        ids = np.arange(start_id + s, start_id + min(n, s + per_dir))
        jobs += [(sub, chunk, seed * 100_003 + d * 101 + k) for k, chunk in enumerate(np.array_split(ids, 4))]
    with Pool(procs) as pool:
        done = 0
        for m in pool.imap_unordered(_write_images, jobs):
            done += m
            if done % 100_000 < m:
                print(f"  {done:,} / {n:,} images", flush=True)
    ids = np.arange(start_id, start_id + n)
    paths = [f"d{(i - start_id) // per_dir:04d}/{i}.png" for i in ids]
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "path": pa.array(paths),
                             "label": pa.array(ids % 10, pa.int64())}), manifest)
    (folder / "_done").touch()
    return manifest


class PeakRSS(threading.Thread):
    """Largest VmHWM of the processes whose command line starts with each of ``names``."""

    def __init__(self, names):
        super().__init__(daemon=True)
        self.names, self.peak, self.stop_ = names, {}, threading.Event()

    def run(self):
        while not self.stop_.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0].decode(errors="replace")
                    name = next((n for n in self.names if cmd.startswith(n)), None)
                    if name is None:
                        continue
                    for line in open(f"/proc/{pid}/status"):
                        if line.startswith(("VmHWM:", "RssShmem:")):
                            key = (name, pid) if line.startswith("VmHWM:") else (name + " shmem", pid)
                            mb = int(line.split()[1]) / 1024
                            self.peak[key] = max(self.peak.get(key, 0), mb)
                except OSError:
                    continue
            time.sleep(0.5)


def run(out: Path, address: str, sets, timeout: int = 7200):
    """A fresh `asvp-ray run` into ``out`` (an earlier run there is removed: resuming a finished
    run would measure nothing)."""
    shutil.rmtree(out, ignore_errors=True)
    args = [CLI, "run", str(SMOKE), "--out", str(out), "--address", address]
    for s in sets:
        args += ["--set", s]
    env = dict(os.environ, TQDM_DISABLE="1")
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{out.name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0, json.loads((out / "summary.json").read_text())


def labelled_by_round(out: Path):
    t = pq.read_table(out / "labeled.parquet").to_pydict()
    by = {}
    for i, r in zip(t["id"], t["round"]):
        by.setdefault(r, []).append(i)
    return {r: sorted(v) for r, v in by.items()}


STRATEGY_SETS = {"margin": "margin", "coreset": "{name: coreset, execution: sharded}", "cluster_margin":
                 "{name: cluster_margin, margin_factor: 10}", "badge": "badge", "entropy": "entropy"}


def image_scenario(out: Path, address: str, manifest: Path, test_manifest: Path, args) -> dict:
    """(c): ``asvp`` on the generated images, extraction included, one refresh (after round 1)."""
    p = args.picks
    sets = [f"data.pool={{kind: manifest, path: '{manifest}'}}", f"data.test={{kind: manifest, path: '{test_manifest}'}}",
            "method=asvp", "refresh.policy=at_labels", f"refresh.at=[{2 * p}]", f"budget.schedule={[p, p, p]}",
            "final.training_method=none", "proxy.epochs=20", "train.epochs=1", "train.lp_epochs=1",
            "extract.batch_size=512", "pool_shards.mode=shards", "pool_shards.num_shards=2", "strategy=margin"]
    mon = PeakRSS(["ray::Driver", "ray::StoreShardHolder", "ray::MapWorker"])
    mon.start()
    d = out / f"run-images-{args.images}"
    wall, s = run(d, address, sets)
    mon.stop_.set()
    mon.join()
    mem = s.get("driver_memory") or {}
    dim = json.loads((d / "features" / "v0" / "meta.json").read_text())["dim"]
    pool_mb = args.images * dim * 4 / 2**20
    versions = []
    for v in s.get("feature_versions", []):
        secs = v.get("seconds")
        versions.append({"version": v.get("version"), "seconds": secs,
                         "images_per_s": round((args.images + 2_000) / secs) if secs else None})
    shard_peaks = sorted(v for (n, _), v in mon.peak.items() if n == "ray::StoreShardHolder")
    actor_peaks = sorted(v for (n, _), v in mon.peak.items() if n == "ray::MapWorker")
    return {"strategy": f"asvp images {args.images:,}", "wall_s": round(wall, 1), "pool_mb": round(pool_mb),
            "rounds": [r["seconds"] for r in s["rounds"]], "refreshed": [r["refreshed"] for r in s["rounds"]],
            "versions": versions, "driver": mem,
            "driver_growth_pct_of_pool": round(100 * (mem.get("peak_growth_mb") or 0) / pool_mb, 1),
            "shard_peaks_mb": [round(x) for x in shard_peaks], "extraction_actor_peaks_mb": [round(x) for x in actor_peaks]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--picks", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--strategies", default="margin,coreset,cluster_margin")
    ap.add_argument("--check-rows", type=int, default=50_000, help="0: skip the identity check")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "scale")
    ap.add_argument("--cpus-per-node", type=int, default=2)
    ap.add_argument("--images", type=int, default=0, help="(c): a pool of this many generated images; 0: skip")
    args = ap.parse_args(argv)

    from ray.cluster_utils import Cluster

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    strategies = [s for s in args.strategies.split(",") if s]
    t0 = time.perf_counter()
    if args.rows:
        write_pool(out / f"pool-{args.rows}x{args.dim}", args.rows, args.dim, seed=0)
        write_pool(out / f"test-{args.dim}", 10_000, args.dim, seed=1, start_id=10**9)
        print(f"pool {args.rows:,} x {args.dim} float32 = {args.rows * args.dim * 4 / 2**20:,.0f} MB "
              f"(written in {time.perf_counter() - t0:.0f}s)", flush=True)
    else:
        strategies = []
    if args.images:
        t0 = time.perf_counter()
        images = write_images(out / f"images-{args.images}", args.images, seed=0)
        test_images = write_images(out / "images-test-2000", 2_000, seed=1, start_id=10**9)
        print(f"image pool: {args.images:,} PNG files ({time.perf_counter() - t0:.0f}s to write or find)", flush=True)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus_per_node})
    cluster.add_node(num_cpus=args.cpus_per_node)
    cluster.wait_for_nodes()
    address = cluster.address
    pool = test = None  # (a) skipped with --rows 0
    if args.rows:
        pool = write_pool(out / f"pool-{args.rows}x{args.dim}", args.rows, args.dim, seed=0)
        test = write_pool(out / f"test-{args.dim}", 10_000, args.dim, seed=1, start_id=10**9)
    common = [f"data.pool={{kind: embeddings, path: '{pool}'}}", f"data.test={{kind: embeddings, path: '{test}'}}",
              "method=svpp", f"budget.schedule={[args.picks] * args.rounds}", "final.training_method=none",
              "proxy.epochs=20", "pool_shards.mode=shards", "pool_shards.num_shards=2"]
    pool_mb = args.rows * args.dim * 4 / 2**20
    rows = []
    checks = []
    try:
        if args.images:
            rows.append(image_scenario(out, address, images, test_images, args))
            print(json.dumps(rows[-1]), flush=True)
        for name in strategies:
            mon = PeakRSS(["ray::Driver", "ray::StoreShardHolder"])
            mon.start()
            wall, s = run(out / f"run-{name}-{args.rows}", address, common + [f"strategy={STRATEGY_SETS[name]}"])
            mon.stop_.set()
            mon.join()
            mem = s.get("driver_memory") or {}
            shard_peaks = sorted(v for (n, _), v in mon.peak.items() if n == "ray::StoreShardHolder")
            # the object store's shared pages the driver touched (ray.get of shard replies), part of its RSS
            shmem = max([v for (n, _), v in mon.peak.items() if n == "ray::Driver shmem"] or [0])
            rows.append({"strategy": name, "wall_s": round(wall, 1), "rounds": [r["seconds"] for r in s["rounds"]],
                         "import_v0_s": (s["feature_versions"][0].get("seconds")), "driver": mem,
                         "driver_growth_pct_of_pool": round(100 * (mem.get("peak_growth_mb") or 0) / pool_mb, 1),
                         "driver_shmem_max_mb": round(shmem), "shard_peaks_mb": [round(x) for x in shard_peaks]})
            print(json.dumps(rows[-1]), flush=True)
        if args.check_rows and args.rows:
            small = write_pool(out / f"pool-{args.check_rows}x{args.dim}", args.check_rows, args.dim, seed=2)
            for name in strategies:
                base = common[:]
                base[0] = f"data.pool={{kind: embeddings, path: '{small}'}}"
                base[3] = f"budget.schedule={[max(10, args.check_rows // 50)] * args.rounds}"
                picked = {}
                for mode in ("driver", "shards"):
                    d = out / f"check-{name}-{mode}"
                    run(d, address, [x for x in base if not x.startswith("pool_shards.mode")] +
                        [f"pool_shards.mode={mode}", f"strategy={STRATEGY_SETS[name]}"])
                    picked[mode] = labelled_by_round(d)
                checks.append((name, picked["driver"] == picked["shards"]))
                print(f"identity check {name} at {args.check_rows:,} rows: "
                      f"{'identical picks' if checks[-1][1] else 'DIFFERENT PICKS'}", flush=True)
    finally:
        cluster.shutdown()

    print("\n| strategy | wall s | per round (select / proxy_train / evaluate s) | driver peak growth MB "
          "(% of the pool matrix) | shard peaks MB (RSS, start-up included) |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "pool_mb" in r:  # (c): its own pool size
            pool_mb = r["pool_mb"]
        per = "; ".join(f"{x.get('select', 0):.1f} / {x.get('proxy_train', 0):.1f} / {x.get('evaluate', 0):.1f}"
                        for x in r["rounds"])
        print(f"| {r['strategy']} | {r['wall_s']} | {per} | {r['driver'].get('peak_growth_mb')} "
              f"({r['driver_growth_pct_of_pool']}% of {pool_mb:,.0f} MB) | {', '.join(map(str, r['shard_peaks_mb']))} |")
        for v in r.get("versions", []):
            print(f"|   {r['strategy']}: feature version v{v['version']} | {v['seconds']} s | {v['images_per_s']} images/s "
                  f"| | |")
    (out / "scale.json").write_text(json.dumps({"args": vars(args) | {"out": str(out)}, "rows": rows,
                                                "checks": checks}, indent=1, default=str))
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
