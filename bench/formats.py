"""One pool of small images stored three ways in an S3 bucket (moto's server on loopback, as the
tests run it): (a) a manifest of single PNG objects, (b) WebDataset tar shards of ``--per-shard``
images, (c) Parquet files with the image bytes (Hugging Face's ``image: {bytes, path}``), side by
side in one run:

- ``asvp-ray run`` (svpp, two rounds of ``--picks``, timm's tiny test model as in
  examples/smoke.yaml, default extraction settings) on each: feature version v0's extraction
  seconds and images/s (pool + the 2,000-image local test set), the index build time (run.log),
  the driver's peak memory growth above its start-up baseline (summary.json -> driver_memory)
  against the pool matrix's bytes (goal: under 15%);
- fetching a ``--fetch``-image labelled set by id (``source.to_dataset(ids)``, materialized) from
  each bucket layout and from the same images as local files (a local manifest), alternating,
  ``--repeat`` times: medians and ratios.

Goals (issue 30): WebDataset and Parquet extraction at least 3x the manifest's images/s from the
bucket; the labelled-set fetch within 2x of local files.

The images are bench/scale.py's (32x32 grayscale PNGs of 10 stripe classes). Usage::

    .venv/bin/python bench/formats.py --images 1000000 --per-shard 10000 --picks 10000 --fetch 10000
    .venv/bin/python bench/formats.py --images 20000 --per-shard 2000 --picks 200 --fetch 2000   # minutes
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tarfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).parent / "asvp-ray")
SMOKE = ROOT / "examples" / "smoke.yaml"
MOTO = ROOT / ".venv-s3" / "bin" / "moto_server"

for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ.setdefault(k, v)


def start_moto(log: Path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    if not MOTO.exists():
        raise SystemExit("no moto server: run `make s3server` first")
    proc = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(port)], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    import urllib.request

    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    return proc, f"127.0.0.1:{port}"


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def upload(fs, items, threads: int = 32) -> float:
    """PUT ``(path, bytes or local file)`` items; seconds taken."""
    def put(item):
        path, data = item
        if isinstance(data, Path):
            data = data.read_bytes()
        with fs.open_output_stream(path) as f:
            f.write(data)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        for _ in ex.map(put, items):
            pass
    return time.perf_counter() - t0


def tar_of(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def put_layouts(fs, bucket: str, folder: Path, manifest: Path, per_shard: int, formats) -> dict:
    """The pool's PNGs as (a) objects + a manifest, (b) tar shards, (c) Parquet files (those of
    ``formats``); upload seconds."""
    t = pq.read_table(manifest).to_pydict()
    ids, paths, labels = t["id"], t["path"], t["label"]
    took = {}
    if "manifest" in formats:
        took["manifest"] = upload(fs, ((f"{bucket}/png/{p}", folder / p) for p in paths))
        with fs.open_output_stream(f"{bucket}/png/manifest.parquet") as f:
            pq.write_table(pq.read_table(manifest), f)

    def shard(k):
        s = k * per_shard
        members = []
        for i, p, lab in zip(ids[s:s + per_shard], paths[s:s + per_shard], labels[s:s + per_shard]):
            members += [(f"{i:09d}.cls", str(lab).encode()), (f"{i:09d}.png", (folder / p).read_bytes())]
        return f"{bucket}/wds/shard-{k:06d}.tar", tar_of(members)

    def part(k):
        s = k * per_shard
        rows = list(zip(ids[s:s + per_shard], paths[s:s + per_shard], labels[s:s + per_shard]))
        image = pa.array([{"bytes": (folder / p).read_bytes(), "path": p} for _, p, _ in rows],
                         pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"id": pa.array([r[0] for r in rows], pa.int64()), "image": image,
                                 "label": pa.array([r[2] for r in rows], pa.int64())}), sink, row_group_size=1000)
        return f"{bucket}/parquet/part-{k:05d}.parquet", sink.getvalue().to_pybytes()

    n_files = (len(ids) + per_shard - 1) // per_shard
    if "webdataset" in formats:
        took["webdataset"] = upload(fs, (shard(k) for k in range(n_files)), threads=4)
    if "parquet_images" in formats:
        took["parquet_images"] = upload(fs, (part(k) for k in range(n_files)), threads=4)
    return {"upload_s": {k: round(v, 1) for k, v in took.items()}, "files": n_files}


def pools(endpoint: str, bucket: str, n_files: int) -> dict:
    q = f"endpoint_override={endpoint}&scheme=http&region=us-east-1"
    return {"manifest": {"kind": "manifest", "path": f"s3://{bucket}/png/manifest.parquet?{q}"},
            "webdataset": {"kind": "webdataset", "shards": f"s3://{bucket}/wds/shard-{{000000..{n_files - 1:06d}}}.tar?{q}"},
            "parquet_images": {"kind": "parquet_images", "path": f"s3://{bucket}/parquet?{q}"}}


def run(out: Path, sets, timeout: int = 7200):
    shutil.rmtree(out, ignore_errors=True)
    args = [CLI, "run", str(SMOKE), "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, TQDM_DISABLE="1"),
                       cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{out.name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0, json.loads((out / "summary.json").read_text())


def run_format(out: Path, pool: dict, test_manifest: Path, n: int, picks: int) -> dict:
    sets = [f"data.pool={json.dumps(pool)}", f"data.test={{kind: manifest, path: '{test_manifest}'}}",
            "method=svpp", f"budget.schedule={[picks, picks]}", "final.training_method=none", "proxy.epochs=20",
            "data.classes=[c0,c1,c2,c3,c4,c5,c6,c7,c8,c9]"]
    wall, s = run(out, sets)
    v0 = next(v for v in s["feature_versions"] if v["version"] == 0)
    dim = json.loads((out / "features" / "v0" / "meta.json").read_text())["dim"]
    pool_mb = n * dim * 4 / 2**20
    mem = s.get("driver_memory") or {}
    m = re.search(r"indexed \d+ image\(s\) in \d+ \S+ of .* in ([\d.]+) s", (out / "run.log").read_text())
    return {"wall_s": round(wall, 1), "v0_s": v0["seconds"], "images_per_s": round((n + 2000) / v0["seconds"]),
            "index_s": float(m.group(1)) if m else None, "driver_peak_growth_mb": mem.get("peak_growth_mb"),
            "pool_mb": round(pool_mb, 1),
            "driver_pct_of_pool": round(100 * (mem.get("peak_growth_mb") or 0) / pool_mb, 1)}


def fetch_times(sources: dict, ids: np.ndarray, repeat: int) -> dict:
    import ray

    times = {k: [] for k in sources}
    for src in sources.values():  # warm-up, not timed: worker processes, filesystems, the OS's file cache
        src.to_dataset(ids[:200]).materialize()
    for _ in range(repeat):
        for name, src in sources.items():
            t0 = time.perf_counter()
            ds = src.to_dataset(ids).materialize()
            took = time.perf_counter() - t0
            if ds.count() != len(ids):
                raise SystemExit(f"{name}: {ds.count()} rows for {len(ids)} ids")
            times[name].append(took)
            del ds
    ray.shutdown()
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--per-shard", type=int, default=10_000)
    ap.add_argument("--picks", type=int, default=10_000)
    ap.add_argument("--fetch", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-formats"))
    ap.add_argument("--formats", default="webdataset,parquet_images,manifest")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import importlib.util  # bench/ is not on sys.path (its select.py would shadow the standard library's)

    spec = importlib.util.spec_from_file_location("bench_scale", os.path.join(_HERE, "scale.py"))
    scale = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = scale  # its image writer runs in a process pool: pickled by this name
    spec.loader.exec_module(scale)
    write_images = scale.write_images

    t0 = time.perf_counter()
    manifest = write_images(out / f"images-{args.images}", args.images, seed=0)
    test_manifest = write_images(out / "images-test-2000", 2_000, seed=1, start_id=10**9)
    print(f"pool: {args.images:,} PNG files ({time.perf_counter() - t0:.0f} s to write or find)", flush=True)

    import pyarrow.fs as pafs

    proc, endpoint = start_moto(out / "moto.log")
    try:
        fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1", allow_bucket_creation=True)
        fs.create_dir("bench")
        t0 = time.perf_counter()
        formats = [f for f in args.formats.split(",") if f]
        put = put_layouts(fs, "bench", manifest.parent, manifest, args.per_shard, formats)
        print(f"bucket: {json.dumps(put)} ({time.perf_counter() - t0:.0f} s), moto RSS {rss_mb(proc.pid):.0f} MB",
              flush=True)
        layouts = pools(endpoint, "bench", put["files"])
        results = {}
        for name in formats:
            results[name] = run_format(out / f"run-{name}", layouts[name], test_manifest, args.images, args.picks)
            print(f"{name}: {json.dumps(results[name])}", flush=True)

        import ray

        from asvp_ray.data.sources import build_source
        from asvp_ray.config import SourceConfig
        from asvp_ray.runtime.ray_utils import init_ray

        init_ray(num_cpus=2)
        ids = np.sort(np.random.default_rng(0).choice(np.arange(args.images), args.fetch, replace=False))
        sources = {"local files": build_source(SourceConfig(kind="manifest", path=str(manifest)))}
        for name in results:
            idx = out / f"run-{name}" / "index"
            sources[name] = build_source(SourceConfig(**layouts[name]), index_dir=idx)
        times = fetch_times(sources, ids, args.repeat)
        med = {k: statistics.median(v) for k, v in times.items()}
        print("\n| pool layout in the bucket | upload s | v0 extraction s | images/s | vs manifest | index build s "
              "| driver peak growth MB (of pool matrix) | fetch "
              f"{args.fetch:,} labelled by id: median s | vs local files |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        base = results.get("manifest", {}).get("images_per_s")
        for name, r in results.items():
            ratio = f"{r['images_per_s'] / base:.2f}x" if base else "-"
            print(f"| {name} | {put['upload_s'][name]} | {r['v0_s']} | {r['images_per_s']:,} | {ratio} | "
                  f"{r['index_s'] if r['index_s'] is not None else '-'} | {r['driver_peak_growth_mb']} "
                  f"({r['driver_pct_of_pool']}% of {r['pool_mb']} MB) | {med[name]:.2f} "
                  f"({', '.join(f'{t:.2f}' for t in times[name])}) | {med[name] / med['local files']:.2f}x |")
        print(f"| local files (manifest of local PNGs) | - | - | - | - | - | - | {med['local files']:.2f} "
              f"({', '.join(f'{t:.2f}' for t in times['local files'])}) | 1.00x |")
        print(f"\nmoto RSS at the end: {rss_mb(proc.pid):.0f} MB")
        (out / "formats.json").write_text(json.dumps({"args": vars(args), "put": put, "results": results,
                                                      "fetch_s": times}, indent=1))
        del ray
    finally:
        os.killpg(proc.pid, 15)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
