"""Feature-extraction throughput: the Ray Data pipeline versus a plain PyTorch loop.

Both sides turn the same Fashion-MNIST images into pooled backbone features, with the same
model (``create_backbone(spec)``), the same ``Preprocessor`` (timm's eval transform), the same
batch size, on the same machine, in ONE invocation:

* ray   -- ``asvp_ray.features.extract.extract(source, spec, cfg)``: read tasks decode the IDX
           file, ``map_batches`` runs ``FeatureExtractor`` on an ``ActorPoolStrategy`` sized by
           ``plan_actors``; the generator is drained (nothing is written to the feature store).
* plain -- a single-process ``torch.utils.data.DataLoader`` (num_workers=0) over a Dataset that
           reads the same uint8 images from the IDX file with ``fashion_mnist.read_idx``, then
           ``Preprocessor`` + ``model`` under ``torch.inference_mode`` with torch using every CPU
           of the machine.

Per run these figures are measured (wall clock, ``time.time()``, comparable across processes):

* ready   -- seconds from the start until the model is loaded and computing. Ray: from the first
             ``next()`` on the generator to the start of the first actor call (this includes
             starting the actor pool, importing torch/timm in the actor and loading the model;
             every ``extract`` call starts a new pool, so warm-up does NOT remove this cost).
             Plain: building the model and reading the IDX file.
* first   -- seconds from the start to the first batch of features reaching the caller.
* total   -- seconds from the start to the last batch; end-to-end rate = images / total.
* steady  -- images / (ready -> last batch): throughput once the model is loaded, including
             every cost of moving batches through the pipeline; the headline ratio compares it.
* model calls -- images / seconds spent inside ``Preprocessor`` + model (per batch, summed):
             pure compute, to tell pipeline overhead from slower compute.

"ready" and "model calls" on the Ray side come from a probe: a thin subclass of
``FeatureExtractor`` that adds two float64 columns (when each actor call began and ended) to
its output; ``extract`` ignores extra columns and the bench reads them as batches pass.
The driver cannot see the first batch early enough to time this itself: Ray Data hands
finished blocks to the iterator late (seconds after the actor finished them on a busy
machine), so "first batch" overstates startup and understates throughput after it.

Ray is initialised once (``init_ray()``); a warm-up run of each side (untimed, ``--warmup``)
comes first, then ``--repeat`` timed runs alternating plain and ray (the machine is shared,
so alternating spreads background noise over both). Best and median over the repeats are
reported, and the ratio ray/plain of the steady-state rates (goal >= 0.90).

Usage::

    .venv/bin/python bench/extract.py                      # 10,000 images, lite0 at 32 px, batch 256
    .venv/bin/python bench/extract.py --images 2000 --repeat 2
    .venv/bin/python bench/extract.py --actor-threads 1    # try other actor sizing
    # on a machine shared with other jobs: level the OpenMP spinning and the Ray worker nice level
    .venv/bin/python bench/extract.py --omp-wait-policy passive --worker-niceness 0
    # the driver's memory while extract_to_store writes a feature version (no throughput figures);
    # above Fashion-MNIST's 60,000 images the pool repeats them under new ids
    .venv/bin/python bench/extract.py --driver-rss --model test_efficientnet --weights none --images 100000
    # the Ray side on a local cluster of 1, then 2 nodes (one machine: overhead, not speed-up)
    .venv/bin/python bench/extract.py --nodes --images 10000 --repeat 2

``--driver-rss`` runs ``extract_to_store`` into a temporary feature store instead: a warm-up
extraction of 256 images (imports, Ray Data start-up), then the timed one of ``--images``, while
a thread samples this process's resident memory (``/proc/self/statm``) every 20 ms. It prints
the baseline before the timed extraction, the peak during it and their difference: the memory
the driver needs to write a version (the workers write the Parquet parts; the driver should
hold no feature).
"""
from __future__ import annotations

import sys
from pathlib import Path

# Python puts this script's folder first on sys.path; a sibling bench script named like a stdlib
# module (e.g. bench/select.py) would then shadow it. Drop the folder, add the repository root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Dict, List  # noqa: E402

import numpy as np  # noqa: E402


def machine_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def pool_source(root, n: int):
    """The first ``n`` Fashion-MNIST train images; beyond its 60,000, the images repeat under new
    ids (``TiledFashionMNIST``), for the driver-memory figure at 100,000 images."""
    from asvp_ray.data.fashion_mnist import FashionMNISTSource

    full = FashionMNISTSource(root=root, split="train")
    if n <= len(full):
        return FashionMNISTSource(root=root, split="train", limit=n)
    return TiledFashionMNIST(root, n)


def _tiled_class():
    from asvp_ray.data.fashion_mnist import FashionMNISTSource

    class TiledFashionMNIST(FashionMNISTSource):
        """Fashion-MNIST's train images repeated: id k shows image k mod 60,000 (ids 0..n-1)."""

        def __init__(self, root, n: int):
            super().__init__(root=root, split="train")
            self._base = len(self._ids)
            self._ids = np.arange(n, dtype=np.int64)
            self._labels = np.resize(self._labels, n)
            self.limit = n

        def to_dataset(self, ids=None, skip_unreadable=False):
            import ray.data

            from asvp_ray.data.base import id_positions
            from asvp_ray.data.fashion_mnist import _IDXDatasource

            pos = id_positions(self._ids, ids)
            return ray.data.read_datasource(_IDXDatasource(str(self.images_path), pos % self._base, self._ids[pos]))

        def describe(self):
            return {**super().describe(), "tiled_to": len(self._ids)}

    return TiledFashionMNIST


def TiledFashionMNIST(root, n: int):  # noqa: N802 - builds the class lazily (imports Ray Data's sources)
    return _tiled_class()(root, n)


# --------------------------------------------------------------------------- plain PyTorch loop
class IDXImages:
    """A map-style ``torch.utils.data.Dataset`` over the first ``n`` images of an IDX file."""

    def __init__(self, path: Path, n: int):
        from asvp_ray.data.fashion_mnist import read_idx

        self.images = read_idx(path, np.arange(n))  # uint8 (n, 28, 28), as the Ray read tasks decode it

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.images[i]

    def __getitems__(self, idx: List[int]) -> np.ndarray:  # batched fetch (torch >= 2.2): one fancy index
        return self.images[np.asarray(idx)]


def _stack(batch) -> np.ndarray:
    return batch if isinstance(batch, np.ndarray) else np.stack(batch)


def run_plain(spec, images_path: Path, n: int, batch_size: int) -> Dict[str, float]:
    """One plain pass: build model + dataset, then DataLoader -> Preprocessor -> model."""
    import torch
    from torch.utils.data import DataLoader

    from asvp_ray.features.backbones import Preprocessor, create_backbone, data_config

    t0 = time.time()
    model = create_backbone(spec)
    pre = Preprocessor(data_config(spec, model))
    loader = DataLoader(IDXImages(images_path, n), batch_size=batch_size, shuffle=False, num_workers=0,
                        collate_fn=_stack)
    rows, dim, compute = 0, 0, 0.0
    t_ready = time.time()  # model loaded, images read: the steady-state window starts
    t_first = None
    with torch.inference_mode():
        for imgs in loader:
            tc = time.time()
            f = model(pre(imgs)).float().numpy()
            compute += time.time() - tc
            rows += len(f)
            dim = f.shape[1]
            if t_first is None:
                t_first = time.time()
    t_end = time.time()
    return _figures(t0, t_ready, t_first, t_end, rows, dim, compute)


# --------------------------------------------------------------------------- the project's Ray pipeline
PROBE_START, PROBE_END, PROBE_NODE = "_bench_t_call", "_bench_t_done", "_bench_node"


def install_probe() -> None:
    """Wrap ``FeatureExtractor`` so each output batch carries the wall time its actor call began
    and ended (two float64 columns, 16 bytes/row next to 5 KB of features; ``extract`` ignores
    them). The driver then knows when the model was ready in the actor -- the start of the
    steady-state window -- and how long the actor spent in model calls."""
    import asvp_ray.features.extract as ext

    base = ext.FeatureExtractor
    if getattr(base, "_bench_probe", False):
        return

    class ProbedFeatureExtractor(base):
        _bench_probe = True

        def __call__(self, batch):
            t = time.time()
            out = super().__call__(batch)
            n = len(out["id"])
            out[PROBE_START] = np.full(n, t)
            out[PROBE_END] = np.full(n, time.time())
            if not hasattr(self, "_bench_node"):
                import ray

                self._bench_node = ray.get_runtime_context().get_node_id()[:8]
            out[PROBE_NODE] = np.full(n, self._bench_node, dtype=object)
            return out

    # the actors cannot import this script: ship the class by value
    ProbedFeatureExtractor.__module__ = __name__
    if __name__ != "__main__":
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ext.FeatureExtractor = ProbedFeatureExtractor


def run_ray(source, spec, cfg, probe: bool) -> Dict[str, float]:
    """One Ray pass: drain ``extract`` (timed from the first ``next()`` to the last batch)."""
    import ray.data

    from asvp_ray.features import extract as ext

    seen: Dict[int, float] = {}  # with the probe: call start -> duration, one per actor call
    nodes: Dict[str, int] = {}  # with the probe: node id prefix -> rows its actors computed

    if probe:  # peek at the probe columns as batches pass through extract's iterator
        orig = ray.data.Dataset.iter_batches

        def iter_batches(self, *a, **k):
            for b in orig(self, *a, **k):
                if PROBE_START in b:
                    starts, ends = b[PROBE_START], b[PROBE_END]
                    for t_s, t_e in set(zip(starts.tolist(), ends.tolist())):
                        seen[t_s] = t_e - t_s
                    for node in b[PROBE_NODE].tolist():
                        nodes[node] = nodes.get(node, 0) + 1
                yield b

        ray.data.Dataset.iter_batches = iter_batches
    try:
        rows, dim = 0, 0
        t_first = None
        t0 = time.time()
        for ids, feats, skipped in ext.extract(source, spec, cfg):
            rows += len(ids)
            dim = feats.shape[1]
            if t_first is None:
                t_first = time.time()
        t_end = time.time()
    finally:
        if probe:
            ray.data.Dataset.iter_batches = orig
    t_ready = min(seen) if seen else float("nan")
    out = _figures(t0, t_ready, t_first, t_end, rows, dim, sum(seen.values()) if seen else float("nan"))
    out["nodes"] = nodes
    return out


def _figures(t0, t_ready, t_first, t_end, rows, dim, compute) -> Dict[str, float]:
    return {
        "startup_s": t_ready - t0,
        "first_s": t_first - t0,
        "total_s": t_end - t0,
        "rows": rows,
        "dim": dim,
        "e2e": rows / (t_end - t0),
        "steady": rows / (t_end - t_ready),
        "compute": rows / compute if compute else float("nan"),
    }


# --------------------------------------------------------------------------- report
def rss_mb() -> float:
    """This process's resident memory in MB (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_driver_rss(source, spec, cfg) -> int:
    """``extract_to_store`` of ``source`` into a temporary store, sampling the driver's RSS."""
    import tempfile
    import threading

    from asvp_ray.data.fashion_mnist import FashionMNISTSource
    from asvp_ray.features.extract import extract_to_store
    from asvp_ray.features.store import FeatureStore

    with tempfile.TemporaryDirectory(prefix="asvp-bench-rss-") as tmp:
        store = FeatureStore(Path(tmp) / "features")
        warm = FashionMNISTSource(root=str(source.root), split="train", limit=256)
        extract_to_store(store, 0, warm, spec, cfg)
        base = rss_mb()
        peak = [base]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mb())
                time.sleep(0.02)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        t0 = time.time()
        meta = extract_to_store(store, 1, source, spec, cfg)
        wall = time.time() - t0
        stop.set()
        t.join()
        end = rss_mb()
        size = sum(f.stat().st_size for f in store.path(1).rglob("*.parquet")) / 2**20
    print(f"extract_to_store: {meta['rows']:,} x {meta['dim']} features ({size:.1f} MB of Parquet) in {wall:.1f} s")
    print(f"driver RSS: baseline {base:.1f} MB, peak {peak[0]:.1f} MB, after {end:.1f} MB; "
          f"growth above baseline: peak {peak[0] - base:+.1f} MB, after {end - base:+.1f} MB")
    return 0


def run_nodes(args, spec, cfg, source) -> int:
    """The Ray side alone on a ``ray.cluster_utils.Cluster`` of 1, then 2 nodes of ``--node-cpus``
    CPUs each (nodes on this one machine: they share its cores, so this shows the overhead of
    spreading over nodes, not a speed-up)."""
    import ray
    from ray.cluster_utils import Cluster

    from asvp_ray.features.extract_plan import plan_actors
    from asvp_ray.runtime.ray_utils import init_ray

    ray.shutdown()
    line = ("{what:<16}: ready {startup_s:5.2f} s  total {total_s:6.2f} s  e2e {e2e:6,.0f} img/s  "
            "steady {steady:6,.0f} img/s  rows per node {nodes}")
    install_probe()
    results = {}
    for n_nodes in (1, 2):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.node_cpus})
        for _ in range(n_nodes - 1):
            cluster.add_node(num_cpus=args.node_cpus)
        cluster.wait_for_nodes()
        try:
            init_ray(address=cluster.address)
            plan = plan_actors(cfg, ray.cluster_resources())
            print(f"{n_nodes} node(s) x {args.node_cpus} CPUs: {plan.min_actors} to {plan.max_actors} actor(s), "
                  f"{plan.torch_threads} torch thread(s) each")
            for w in range(args.warmup):
                print(line.format(what=f"{n_nodes} node warm-up", **run_ray(source, spec, cfg, probe=True)))
            runs = []
            for k in range(args.repeat):
                r = run_ray(source, spec, cfg, probe=True)
                if r["rows"] != len(source):
                    print(f"error: {r['rows']} rows, expected {len(source)}", file=sys.stderr)
                    return 1
                runs.append(r)
                print(line.format(what=f"{n_nodes} node run {k + 1}", **r))
            results[n_nodes] = summarise(runs)
        finally:
            ray.shutdown()
            cluster.shutdown()
    for key, what in (("steady", "steady state"), ("e2e", "end to end")):
        b1, m1 = results[1][key]
        b2, m2 = results[2][key]
        print(f"{what}: 1 node {b1:,.0f} / {m1:,.0f} img/s, 2 nodes {b2:,.0f} / {m2:,.0f} img/s (best / median): "
              f"2 nodes / 1 node = {b2 / b1:.2f}x best, {m2 / m1:.2f}x median")
    print(f"(both 'nodes' share this machine's {machine_cpus()} cores: the ratio is the cost of spreading over "
          "nodes, not a speed-up)")
    return 0


def summarise(runs: List[Dict[str, float]]) -> Dict[str, float]:
    out = {}
    for key in ("startup_s", "first_s", "total_s"):
        v = [r[key] for r in runs]
        out[key] = (min(v), statistics.median(v))
    for key in ("e2e", "steady", "compute"):
        v = [r[key] for r in runs]
        out[key] = (max(v), statistics.median(v))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Images/s of asvp-ray's Ray Data extraction pipeline vs a plain single-process PyTorch "
                    "DataLoader loop over the same Fashion-MNIST images, model, preprocessing and batch size. "
                    "Prints both rates (time-to-first-batch, end-to-end and steady state; best and median of "
                    "--repeat alternating runs) and the ratio ray/plain of the steady-state rates (goal >= 0.90).",
        epilog=__doc__.split("Usage::")[1] if "Usage::" in __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tf_efficientnet_lite0", help="timm model name (default %(default)s)")
    ap.add_argument("--weights", default="lite0_package",
                    help="BackboneSpec.weights: lite0_package (offline), none, hub, auto or a file "
                         "(default %(default)s)")
    ap.add_argument("--images", type=int, default=10_000, help="pool size: the first N Fashion-MNIST train "
                    "images (default %(default)s)")
    ap.add_argument("--image-size", type=int, default=32, help="model input side in px (default %(default)s)")
    ap.add_argument("--crop-pct", type=float, default=1.0, help="centre-crop fraction (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=256, help="images per model call, both sides "
                    "(default %(default)s)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each side, alternating plain/ray; "
                    "best and median are reported (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs of each side before timing "
                    "(default %(default)s; 0 to skip)")
    ap.add_argument("--root", default=None, help="folder with the Fashion-MNIST IDX files (default: found)")
    ap.add_argument("--plain-threads", type=int, default=None,
                    help="torch threads of the plain loop (default: every CPU of the machine)")
    ap.add_argument("--num-actors", type=int, default=None, help="ExtractConfig.num_actors (default: auto)")
    ap.add_argument("--num-cpus-per-actor", type=float, default=1.0,
                    help="ExtractConfig.num_cpus_per_actor (default %(default)s)")
    ap.add_argument("--actor-threads", type=int, default=None,
                    help="ExtractConfig.torch_threads: torch threads per actor (default: auto, CPUs / actors)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    ap.add_argument("--omp-wait-policy", choices=["unset", "passive", "active"], default="unset",
                    help="set OMP_WAIT_POLICY for both sides (the Ray workers inherit it) before torch loads. "
                         "On a machine shared with other jobs, libgomp's default spin-waiting makes a multi-thread "
                         "loop on the main thread collapse (every barrier waits for a descheduled thread) while "
                         "the Ray actor, whose model runs on a second thread, spins little -- the comparison "
                         "then measures spinning, not Ray; 'passive' levels it (default: %(default)s)")
    ap.add_argument("--worker-niceness", type=int, default=None,
                    help="RAY_worker_niceness for the local Ray instance (Ray's default runs workers, hence the "
                         "extraction actor, at nice 15, so other jobs on a shared machine outrank it while the plain "
                         "loop runs at the shell's nice; 0 puts both on an equal footing)")
    ap.add_argument("--nodes", action="store_true",
                    help="the Ray side alone on a local Cluster of 1 then 2 nodes (--node-cpus each): how "
                         "throughput changes from 1 to 2 nodes (on one machine: overhead, not speed-up)")
    ap.add_argument("--node-cpus", type=int, default=2, help="CPUs of each node with --nodes (default %(default)s)")
    ap.add_argument("--driver-rss", action="store_true",
                    help="measure the driver's memory during extract_to_store of --images instead (see above)")
    args = ap.parse_args(argv)
    if args.worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
    if args.omp_wait_policy != "unset":
        if "torch" in sys.modules:
            print("warning: torch already imported, --omp-wait-policy has no effect here", file=sys.stderr)
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()

    import ray
    import torch

    from asvp_ray.config import ExtractConfig
    from asvp_ray.features.backbones import BackboneSpec
    from asvp_ray.features.extract_plan import plan_actors
    from asvp_ray.runtime.ray_utils import init_ray

    os.environ.setdefault("TQDM_DISABLE", "1")
    cpus = machine_cpus()
    plain_threads = args.plain_threads or cpus
    torch.set_num_threads(plain_threads)

    spec = BackboneSpec(name=args.model, weights=args.weights, image_size=args.image_size, crop_pct=args.crop_pct)
    cfg = ExtractConfig(batch_size=args.batch_size, num_actors=args.num_actors,
                        num_cpus_per_actor=args.num_cpus_per_actor, torch_threads=args.actor_threads,
                        device="cpu" if not torch.cuda.is_available() else "auto", progress=False)
    source = pool_source(args.root, args.images)
    n = len(source)
    if n < args.images or (n > 60_000 and not (args.driver_rss or args.nodes)):
        ap.error(f"--images {args.images}: the plain-loop comparison reads at most Fashion-MNIST's 60,000 train "
                 "images (--driver-rss and --nodes repeat them for larger pools)")
    if args.nodes:
        return run_nodes(args, spec, cfg, source)

    t = time.perf_counter()
    init_ray(num_cpus=args.num_cpus)
    t_init = time.perf_counter() - t
    res = ray.cluster_resources()
    plan = plan_actors(cfg, res)
    if args.driver_rss:
        print(f"actor plan: {plan}; model {spec.name} weights={spec.weights}; {n:,} images, batch {args.batch_size}")
        return run_driver_rss(source, spec, cfg)

    print(f"machine: {cpus} CPUs (os), Ray cluster: {res.get('CPU', 0):g} CPU / {res.get('GPU', 0):g} GPU; "
          f"ray {ray.__version__}, torch {torch.__version__}")
    print(f"model {spec.name} weights={spec.weights} image_size={spec.image_size} crop_pct={spec.crop_pct}; "
          f"{n:,} images, batch {args.batch_size}")
    print(f"actor plan: {plan}")
    print(f"plain loop: 1 process (nice {os.nice(0)}), DataLoader num_workers=0, torch threads {plain_threads}; "
          f"Ray workers at nice {os.environ.get('RAY_worker_niceness', '15 (Ray default)')}")
    print(f"init_ray: {t_init:.2f} s (once, excluded); OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    load0 = os.getloadavg()[0]
    print(f"load average at start: {load0:.1f} on {cpus} CPUs")

    def plain():
        return run_plain(spec, source.images_path, n, args.batch_size)

    def ray_run():
        return run_ray(source, spec, cfg, probe=True)

    install_probe()
    line = ("{what:<14}: ready {startup_s:5.2f} s  first {first_s:5.2f} s  total {total_s:6.2f} s  "
            "e2e {e2e:6,.0f} img/s  steady {steady:6,.0f} img/s  model calls {compute:6,.0f} img/s")
    for w in range(args.warmup):
        for name, fn in (("plain", plain), ("ray", ray_run)):
            r = fn()
            print(line.format(what=f"warm-up {name}", **r))

    runs: Dict[str, List[Dict[str, float]]] = {"plain": [], "ray": []}
    for k in range(args.repeat):
        order = (("plain", plain), ("ray", ray_run)) if k % 2 == 0 else (("ray", ray_run), ("plain", plain))
        for name, fn in order:
            r = fn()
            if r["rows"] != n:
                print(f"error: {name} produced {r['rows']} rows, expected {n}", file=sys.stderr)
                return 1
            runs[name].append(r)
            print(line.format(what=f"run {k + 1} {name}", **r))

    s = {k: summarise(v) for k, v in runs.items()}
    cols = [("ready s", "startup_s", ".2f"), ("first batch s", "first_s", ".2f"), ("total s", "total_s", ".2f"),
            ("end-to-end img/s", "e2e", ",.0f"), ("steady img/s", "steady", ",.0f"),
            ("model calls img/s", "compute", ",.0f")]
    print(f"\n{args.repeat} timed run(s) each; figures are best / median")
    print(f"{'':<6}" + "".join(f"{c:>19}" for c, _, _ in cols))
    for name in ("plain", "ray"):
        cells = [f"{format(s[name][k][0], f)} / {format(s[name][k][1], f)}" for _, k, f in cols]
        print(f"{name:<6}" + "".join(f"{c:>19}" for c in cells))
    print("ready: start -> model loaded (ray: first actor call began); first batch: start -> first batch at the "
          "driver;\nsteady: images / (ready -> last batch); model calls: images / time inside "
          "Preprocessor + model")

    def ratio(key, i):
        return s["ray"][key][i] / s["plain"][key][i]

    print(f"\nend-to-end ratio ray/plain (incl. actor start + model load): {ratio('e2e', 0):.2f}x best, "
          f"{ratio('e2e', 1):.2f}x median")
    print(f"model-call ratio ray/plain (compute only): {ratio('compute', 0):.2f}x best, {ratio('compute', 1):.2f}x median")
    print(f"steady-state ratio ray/plain: {ratio('steady', 0):.2f}x best, {ratio('steady', 1):.2f}x median")
    load1 = os.getloadavg()[0]
    if max(load0, load1) > cpus:
        print(f"note: load average {load0:.1f} -> {load1:.1f} on {cpus} CPUs: other jobs share this machine, figures "
              "are noisy (see --omp-wait-policy)")
    r = ratio("steady", 0)
    print(f"ratio ray/plain: {r:.2f}x (goal >= 0.90)  [steady state, best of {args.repeat}]"
          f"{'' if r >= 0.9 else '  BELOW GOAL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
