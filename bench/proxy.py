"""Proxy scoring throughput versus this machine's own matmul rate.

Scoring the pool with the MLP proxy is matmul-bound: per row, 2*D*H flops for the first
layer and 2*H*C for the second. This benchmark times ``MLPProxy.predict_proba`` on a
synthetic (rows x dim) float32 pool and, side by side, a bare ``torch.mm`` of the same
shapes (chunk x dim @ dim x hidden), and reports the fraction of the matmul rate that
scoring achieves (goal: >= 0.5).

With ``--in-actor`` it also times the proxy's fit and scoring inside a zero-CPU Ray actor, as
`asvp-ray run`'s driver actor runs them: once set up the way the driver actor is (threads =
the node's CPUs and its allocator settings, ``asvp_ray.loop.actor``) and once as Ray sets up such an actor by itself
(``OMP_NUM_THREADS=1``), each as a ratio of this process's figures (goal: >= 0.9x).

Usage::

    .venv/bin/python bench/proxy.py --rows 200000
    .venv/bin/python bench/proxy.py --rows 200000 --dim 1280 --in-actor
    .venv/bin/python bench/proxy.py            # 1,000,000 x 1280, about 5 GB of features
"""
from __future__ import annotations

import os
import sys

# This folder holds bench/select.py, which would shadow the standard library's `select` module
# (imported by subprocess, torch, ...): drop the folder from the path, add the repository root.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from asvp_ray.proxy.mlp import MLPProxy  # noqa: E402


def best_time(fn, repeat: int) -> tuple[float, float]:
    """(best, median) wall seconds of ``repeat`` calls of ``fn``."""
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="pool rows N")
    ap.add_argument("--dim", type=int, default=1280, help="feature width D")
    ap.add_argument("--hidden", type=int, default=None, help="proxy hidden width H (default D)")
    ap.add_argument("--classes", type=int, default=10, help="classes C")
    ap.add_argument("--chunk", type=int, default=65536, help="proxy chunk_size")
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions (best is reported)")
    ap.add_argument("--fit-rows", type=int, default=4096, help="labelled rows the proxy is fitted on")
    ap.add_argument("--fit-epochs", type=int, default=2, help="epochs of the brief fit")
    ap.add_argument("--normalize", default="none", choices=["none", "l2", "standardize"])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--naive", action="store_true", help="also time the unfolded nn.Module forward")
    ap.add_argument("--in-actor", action="store_true",
                    help="also time fit and scoring inside zero-CPU Ray actors (the driver actor's setting and "
                         "Ray's default), as ratios of this process's figures")
    args = ap.parse_args(argv)
    if args.in_actor:
        return in_actor(args)

    N, D, C = args.rows, args.dim, args.classes
    H = args.hidden or D
    chunk = min(args.chunk, N)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print(f"pool {N:,} x {D} float32 ({N * D * 4 / 2**30:.2f} GiB), hidden {H}, classes {C}, chunk {chunk:,}")

    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(N, D, generator=gen).numpy()
    labels = np.random.default_rng(0).integers(0, C, size=min(args.fit_rows, N))

    proxy = MLPProxy(
        hidden=H, epochs=args.fit_epochs, batch_size=2048, normalize=args.normalize,
        device=args.device, chunk_size=chunk,
    )
    t0 = time.perf_counter()
    proxy.fit(pool[: len(labels)], labels, num_classes=C)
    print(f"fit on {len(labels):,} rows x {args.fit_epochs} epochs: {time.perf_counter() - t0:.2f} s")

    proxy.predict_proba(pool[:chunk])  # warm-up (threads, allocator)
    t_score, t_score_med = best_time(lambda: proxy.predict_proba(pool), args.repeat)

    dev = proxy.device_
    a = torch.from_numpy(pool[:chunk]).to(dev)
    w = torch.randn(D, H, generator=gen).to(dev)
    out = torch.empty(chunk, H, device=dev)
    torch.mm(a, w, out=out)
    n_mm = max(1, N // chunk)
    t_mm, _ = best_time(lambda: [torch.mm(a, w, out=out) for _ in range(n_mm)], args.repeat)

    flops_score = 2.0 * N * D * H + 2.0 * N * H * C
    gflops_score = flops_score / t_score / 1e9
    gflops_mm = 2.0 * chunk * D * H * n_mm / t_mm / 1e9

    rows = [
        ("proxy predict_proba", N / t_score, gflops_score, f"best {t_score:.2f} s, median {t_score_med:.2f} s"),
        (f"torch.mm {chunk}x{D} @ {D}x{H}", chunk * n_mm / t_mm, gflops_mm, f"best {t_mm:.2f} s for {n_mm} mm"),
    ]
    if args.naive:
        net = proxy.module_

        def naive():
            with torch.inference_mode():
                for s in range(0, N, chunk):
                    torch.softmax(net(torch.from_numpy(pool[s : s + chunk]).to(dev)), 1).cpu()

        t_naive, _ = best_time(naive, args.repeat)
        rows.append(("nn.Module forward (unfolded)", N / t_naive, flops_score / t_naive / 1e9, f"best {t_naive:.2f} s"))

    print(f"\n{'what':<34}{'rows/s':>14}{'GFLOP/s':>10}  timing")
    for name, rps, gf, note in rows:
        print(f"{name:<34}{rps:>14,.0f}{gf:>10.1f}  {note}")
    frac = gflops_score / gflops_mm
    print(f"\nscoring achieves {frac:.2f} of the matmul rate (goal >= 0.5): {'OK' if frac >= 0.5 else 'BELOW GOAL'}")
    return 0


def fit_and_score(rows: int, dim: int, hidden: int, classes: int, chunk: int, fit_rows: int, fit_epochs: int,
                  repeat: int) -> dict:
    """Seconds to fit the proxy and to score the pool (best of ``repeat``), in this process."""
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(rows, dim, generator=gen).numpy()
    labels = np.random.default_rng(0).integers(0, classes, size=min(fit_rows, rows))
    proxy = MLPProxy(hidden=hidden, epochs=fit_epochs, batch_size=256, device="cpu", chunk_size=min(chunk, rows))
    fit_s, _ = best_time(lambda: proxy.fit(pool[: len(labels)], labels, num_classes=classes), repeat)
    proxy.predict_proba(pool[:chunk])
    score_s, _ = best_time(lambda: proxy.predict_proba(pool), repeat)
    return {"fit_s": fit_s, "score_s": score_s, "threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def in_actor(args) -> int:
    import ray

    from asvp_ray.runtime.allocator import lean_memory_env
    from asvp_ray.runtime.device import set_compute_threads, thread_env
    from asvp_ray.runtime.resources import node_cpus

    work = dict(rows=args.rows, dim=args.dim, hidden=args.hidden or args.dim, classes=args.classes, chunk=args.chunk,
                fit_rows=args.fit_rows, fit_epochs=args.fit_epochs, repeat=args.repeat)
    print(f"pool {args.rows:,} x {args.dim}, hidden {work['hidden']}, fit on {work['fit_rows']:,} rows x "
          f"{args.fit_epochs} epochs; best of {args.repeat}")
    ray.init(num_cpus=node_cpus(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.path.dirname(_HERE)}})

    @ray.remote(num_cpus=0)
    class Probe:
        def __init__(self, threads):
            if threads:
                set_compute_threads(threads)

        def run(self, work):
            return fit_and_score(**work)

    results = {"this process": fit_and_score(**work)}
    n = node_cpus()
    for name, env, threads in (("driver actor (asvp-ray's setting)", {**thread_env(n), **lean_memory_env()}, n),
                               ("zero-CPU actor (Ray's default)", None, None)):
        actor = Probe.options(runtime_env={"env_vars": env} if env else None).remote(threads)
        results[name] = ray.get(actor.run.remote(work))
        ray.kill(actor)
    ray.shutdown()
    base = results["this process"]
    print(f"\n{'where':<36}{'threads':>8}{'fit s':>9}{'score s':>9}{'fit x':>8}{'score x':>9}")
    for name, r in results.items():
        print(f"{name:<36}{r['threads']:>8}{r['fit_s']:>9.2f}{r['score_s']:>9.2f}"
              f"{base['fit_s'] / r['fit_s']:>8.2f}{base['score_s'] / r['score_s']:>9.2f}")
    d = results["driver actor (asvp-ray's setting)"]
    ok = base["score_s"] / d["score_s"] >= 0.9 and base["fit_s"] / d["fit_s"] >= 0.9
    print(f"\nthe driver actor reaches {base['fit_s'] / d['fit_s']:.2f}x (fit) and {base['score_s'] / d['score_s']:.2f}x "
          f"(score) of this process (goal >= 0.9x): {'OK' if ok else 'BELOW GOAL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
