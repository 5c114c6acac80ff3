"""End to end at pool scale: `asvp-ray run` on a local two-node Ray cluster, the pool held by
shard actors that load it from the feature store (`pool_shards.mode: shards`).

(a) A seeded ``--rows`` x ``--dim`` embeddings pool (``data.pool.kind: embeddings``, Parquet
    parts of 100,000 rows), ``svpp``, ``--rounds`` rounds of ``--picks`` picks, for each of
    ``--strategies``: per-phase seconds of every round, the driver's peak resident memory above
    its own start-up baseline (summary.json -> driver_memory; goal: under 15% of the pool
    matrix's bytes) and each shard actor's peak (sampled from /proc while the run goes).
(b) ``--check-rows``: the same runs on a smaller pool with the pool in the driver and in shards:
    the labelled ids of every round must be identical.
The issue's second scenario (a 1,000,000-image pool through extraction with timm's tiny test
model, ``asvp`` with one refresh) is not in this script yet.

On one machine the two "nodes" share its cores: the figures show overhead and memory, not
speed-up.

Usage::

    .venv/bin/python bench/scale.py --rows 1000000 --dim 512 --picks 10000      # (a) + (b)
    .venv/bin/python bench/scale.py --rows 100000 --picks 1000 --check-rows 20000  # minutes
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
    args = ap.parse_args(argv)

    from ray.cluster_utils import Cluster

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    strategies = [s for s in args.strategies.split(",") if s]
    t0 = time.perf_counter()
    pool = write_pool(out / f"pool-{args.rows}x{args.dim}", args.rows, args.dim, seed=0)
    test = write_pool(out / f"test-{args.dim}", 10_000, args.dim, seed=1, start_id=10**9)
    print(f"pool {args.rows:,} x {args.dim} float32 = {args.rows * args.dim * 4 / 2**20:,.0f} MB "
          f"(written in {time.perf_counter() - t0:.0f}s)", flush=True)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus_per_node})
    cluster.add_node(num_cpus=args.cpus_per_node)
    cluster.wait_for_nodes()
    address = cluster.address
    common = [f"data.pool={{kind: embeddings, path: '{pool}'}}", f"data.test={{kind: embeddings, path: '{test}'}}",
              "method=svpp", f"budget.schedule={[args.picks] * args.rounds}", "final.training_method=none",
              "proxy.epochs=20", "pool_shards.mode=shards", "pool_shards.num_shards=2"]
    pool_mb = args.rows * args.dim * 4 / 2**20
    rows = []
    try:
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
        checks = []
        if args.check_rows:
            small = write_pool(out / f"pool-{args.check_rows}x{args.dim}", args.check_rows, args.dim, seed=2)
            for name in strategies:
                base = common[:]
                base[0] = f"data.pool={{kind: embeddings, path: '{small}'}}"
                base[3] = f"budget.schedule={[max(10, args.check_rows // 50)] * args.rounds}"
                picked = {}
                for mode in ("driver", "shards"):
                    d = out / f"check-{name}-{mode}"
                    shutil.rmtree(d, ignore_errors=True)
                    run(d, address, [x for x in base if not x.startswith("pool_shards.mode")] +
                        [f"pool_shards.mode={mode}", f"strategy={STRATEGY_SETS[name]}"])
                    picked[mode] = labelled_by_round(d)
                checks.append((name, picked["driver"] == picked["shards"]))
                print(f"identity check {name} at {args.check_rows:,} rows: "
                      f"{'identical picks' if checks[-1][1] else 'DIFFERENT PICKS'}", flush=True)
    finally:
        cluster.shutdown()

    print(f"\n| strategy | wall s | per round (select / proxy_train / evaluate s) | driver peak growth MB "
          f"(% of the {pool_mb:,.0f} MB pool) | shard peaks MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        per = "; ".join(f"{x.get('select', 0):.1f} / {x.get('proxy_train', 0):.1f} / {x.get('evaluate', 0):.1f}"
                        for x in r["rounds"])
        print(f"| {r['strategy']} | {r['wall_s']} | {per} | {r['driver'].get('peak_growth_mb')} "
              f"({r['driver_growth_pct_of_pool']}%) | {', '.join(map(str, r['shard_peaks_mb']))} |")
    (out / "scale.json").write_text(json.dumps({"args": vars(args) | {"out": str(out)}, "rows": rows,
                                                "checks": checks}, indent=1, default=str))
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
