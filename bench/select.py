"""Selection at scale: exact, memory-bounded strategies versus the reference code's algorithms.

Sections (all on the same synthetic clustered features, float32, seeded):

1. coreset: k-center greedy versus a faithful re-implementation of the reference's loop
   (ASVP ``acquire_new_sample``: torch, the pool concatenated without the pick after every
   pick) at ``--coreset-rows`` x ``--dim``; identical picks, speed-up, time per pick as a
   multiple of one read of the pool (the memory-bandwidth floor), pruned and dense; the
   cached state's setup cost in the next round; the reference's per-pick time at
   ``--rows`` (measured on a few picks) against ours.
2. badge: versus the reference's approach (materialised gradient embeddings, full N x N
   distance matrix, ``np.ix_`` per pick) at ``--badge-rows``; identical picks, speed-up, peak
   memory; versus the plain factorised form (a fresh distance pass per pick) at ``--rows``.
3. uncertainty: chunked top-n (argpartition merges) versus a full sort, at each of
   ``--uncertainty-rows``.
4. probcover's delta graph at ``--rows``: IVF build, mean degree, recall against the exact
   graph on a ``--recall-sample`` subset (and for sampled queries against the full pool).
5. every strategy on ``--rows`` x ``--dim`` with ``--picks`` picks: seconds, peak extra memory.
6. sharded coreset on a two-node local Ray cluster versus one process: same picks, time.

Peak extra memory = the largest resident-set size sampled every 2 ms during a call minus the
resident size before it (glibc is told to return large blocks to the OS at once).

Usage::

    .venv/bin/python bench/select.py --small            # a few minutes at reduced sizes
    .venv/bin/python bench/select.py                    # full size (1,000,000 x 512)
    .venv/bin/python bench/select.py --sections coreset,badge --json out.json
"""
from __future__ import annotations

import os
import sys

# This file is named like the standard library's ``select`` module: keep its folder off the
# import path, or ``import subprocess`` would import this script.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import gc
import json
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

# Large frees go straight back to the OS, so resident-set samples measure live memory.
if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and __name__ == "__main__":
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    os.execv(sys.executable, [sys.executable] + sys.argv)

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asvp_ray.pool.view import PoolView  # noqa: E402
from asvp_ray.selection import STRATEGIES, top_n  # noqa: E402
from asvp_ray.selection._graph import delta_graph, graph_recall  # noqa: E402
from asvp_ray.selection.badge import gradient_embedding_parts  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


# ============================================================================ measurement
def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakMemory:
    """Peak resident-set growth during a ``with`` block, sampled every 2 ms."""

    def __enter__(self):
        gc.collect()
        self.base = rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def timed(fn: Callable, *args, **kw):
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        dt = time.perf_counter() - t0
    return out, dt, mem.extra_mb


def best_of(fn: Callable, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def read_floor(X: np.ndarray) -> float:
    """Seconds of one streaming read of X: best of a max-reduction and a GEMV."""
    v = np.ones(X.shape[1], dtype=np.float32)
    return min(best_of(lambda: X.max()), best_of(lambda: X @ v))


def log(msg: str) -> None:
    print(msg, flush=True)


# ============================================================================ data
def clustered_features(N: int, D: int, seed: int, n_clusters: int = 1000, latent: int = 16) -> Tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters of low intrinsic dimension in R^D (features of a pre-trained model
    look like this more than isotropic noise does): centre + A_k z (z in R^latent) + noise.

    Returns:
        (float32 (N, D) features, int64 (N,) cluster of each row).
    """
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, n_clusters, size=N)
    cent = rng.standard_normal((n_clusters, D), dtype=np.float32)
    scale = rng.uniform(0.15, 0.45, size=n_clusters).astype(np.float32)
    X = np.empty((N, D), dtype=np.float32)
    order = np.argsort(lab, kind="stable")
    bounds = np.searchsorted(lab[order], np.arange(n_clusters + 1))
    for k in range(n_clusters):
        idx = order[bounds[k] : bounds[k + 1]]
        if not len(idx):
            continue
        A = rng.standard_normal((latent, D), dtype=np.float32) * scale[k]
        z = rng.standard_normal((len(idx), latent), dtype=np.float32)
        X[idx] = cent[k] + z @ A + 0.05 * rng.standard_normal((len(idx), D), dtype=np.float32)
    return X, lab


def initial_mask(N: int, labeled: int, seed: int) -> np.ndarray:
    mask = np.zeros(N, dtype=bool)
    mask[np.random.default_rng(seed + 1).choice(N, size=labeled, replace=False)] = True
    return mask


def proxy_labels(X: np.ndarray, classes: int, seed: int) -> np.ndarray:
    """Labels of a linearly separable task on the features (argmax of a random projection):
    the proxy can generalise from a few labels, as on features of a pre-trained model."""
    W = np.random.default_rng(seed + 7).standard_normal((X.shape[1], classes)).astype(np.float32)
    y = np.empty(len(X), dtype=np.int64)
    for s in range(0, len(X), 65536):
        y[s : s + 65536] = np.argmax(X[s : s + 65536] @ W, axis=1)
    return y


def fit_proxy(X: np.ndarray, y: np.ndarray, mask: np.ndarray, classes: int, hidden: int):
    """The reference MLP proxy (hidden = D), trained on the labelled rows to convergence."""
    from asvp_ray.proxy.mlp import MLPProxy

    proxy = MLPProxy(hidden=hidden, epochs=100, batch_size=32, chunk_size=16384, seed=0)
    return proxy.fit(X[mask], y[mask], num_classes=classes)


# ============================================================================ reference algorithms
def _ref_similarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The reference's ``cal_similarity_matrix`` (squared distances via ones-matmuls)."""
    yt = torch.transpose(y, 1, 0)
    x2 = torch.mul(x, x)
    y2 = torch.mul(y, y)
    xy = torch.mm(x, yt)
    onex = torch.ones(1, y.size(0))
    oney = torch.ones(x.size(0), 1)
    x22 = torch.mm(torch.sum(x2, dim=1).unsqueeze(1), onex)
    y22 = torch.mm(oney, torch.sum(y2, dim=1).unsqueeze(0))
    return x22 + y22 - 2 * xy


def reference_coreset(X: np.ndarray, mask: np.ndarray, n: int, timing: Optional[dict] = None) -> List[int]:
    """The reference's coreset loop: a min over the (centres x pool) rows, the pool
    concatenated without the pick after every pick."""
    t0 = time.perf_counter()
    candnamelist = np.flatnonzero(~mask).tolist()
    emb_lab = torch.from_numpy(np.ascontiguousarray(X[mask]))
    emb_un = torch.from_numpy(np.ascontiguousarray(X[~mask]))
    v = _ref_similarity(emb_lab, emb_un)
    if timing is not None:
        timing["setup_s"] = time.perf_counter() - t0
    new_sample = []
    for _ in range(n):
        v, _ = torch.min(v, dim=0)
        sel = int(np.argmax(v.numpy()))
        new_sample.append(candnamelist[sel])
        del candnamelist[sel]
        emb_new = emb_un[sel, :].unsqueeze(0)
        emb_un = torch.cat([emb_un[:sel, :], emb_un[sel + 1 :, :]], dim=0)
        addsimrow = _ref_similarity(emb_new, emb_un)
        v = torch.cat((v[:sel], v[(sel + 1) :]))
        v = torch.cat([v.unsqueeze(0), addsimrow])
    return new_sample


def _ref_euclidean_distances(x: np.ndarray) -> np.ndarray:
    """The reference's ``euclidean_distances(x, x, squared=True)``."""
    x_square = np.sum(x * x, axis=1, keepdims=True)
    distances = np.dot(x, x.T)
    distances *= -2
    distances += x_square
    distances += x_square.T
    np.maximum(distances, 0, out=distances)
    distances.flat[:: distances.shape[0] + 1] = 0.0
    return distances


def reference_badge(E: np.ndarray, H: np.ndarray, n: int, rng: np.random.Generator) -> List[int]:
    """The reference's BADGE: materialised gradient embeddings, the full N x N squared
    distance matrix, ``dist[np.ix_(chosen, rest)]`` per pick (probabilities normalised in
    float64 so that ``Generator.choice`` accepts them)."""
    emb = (E[:, :, None] * H[:, None, :]).reshape(len(E), -1)
    dist = _ref_euclidean_distances(emb)
    del emb
    candidx = list(range(len(E)))
    newidx = [int(rng.integers(0, len(candidx)))]
    restidx = list(set(candidx) - set(newidx))
    for _ in range(n - 1):
        tdist = dist[np.ix_(newidx, restidx)].min(axis=0)
        prob = tdist.astype(np.float64) / tdist.sum(dtype=np.float64)
        newidx += rng.choice(a=restidx, size=1, replace=False, p=prob).tolist()
        restidx = list(set(candidx) - set(newidx))
    return newidx


def plain_badge(E: np.ndarray, H: np.ndarray, n: int, rng: np.random.Generator) -> List[int]:
    """The plain factorised form: a fresh full distance pass (and cumsum) per pick."""
    a = np.einsum("ij,ij->i", E, E, dtype=np.float64) * np.einsum("ij,ij->i", H, H, dtype=np.float64)
    taken = np.zeros(len(E), dtype=bool)
    c = int(rng.integers(len(E)))
    picks, d2 = [c], np.full(len(E), np.inf)
    taken[c] = True
    while len(picks) < n:
        d = a + a[c] - 2.0 * (E @ E[c]).astype(np.float64) * (H @ H[c])
        d2 = np.minimum(d2, np.maximum(d, 0.0))
        w = np.where(taken, 0.0, d2)
        cs = np.cumsum(w)
        c = int(np.searchsorted(cs, rng.random() * cs[-1], side="right"))
        picks.append(c)
        taken[c] = True
    return picks


def first_mismatch(a, b) -> int:
    a, b = np.asarray(a), np.asarray(b)
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if len(diff) else m


# ============================================================================ sections
def section_coreset(args, X: np.ndarray, mask: np.ndarray, big: Optional[Tuple[np.ndarray, np.ndarray]], out: dict) -> None:
    N = len(X)
    n = args.picks
    floor = read_floor(X)
    log(f"\n== coreset: {N:,} x {X.shape[1]}, {mask.sum()} labelled, {n} picks; one read of the pool {floor * 1e3:.2f} ms")
    res: Dict[str, object] = {"rows": N, "picks": n, "read_floor_s": floor}
    pool = PoolView(ids=np.arange(N, dtype=np.int64), features=X, labeled_mask=mask)
    rng = np.random.default_rng(0)

    for prune in (True, False):
        s = STRATEGIES.create("coreset", prune=prune, execution="local")
        ids, t, mem = timed(s.select, pool, n, rng)
        t_setup = s.last_timing_["setup_s"]  # norms + distances to the labelled set
        per_pick = (t - t_setup) / n
        evals = sum(st["dist_evals"] - st["setup_evals"] for st in s.stats())
        tag = "pruned" if prune else "dense"
        res[tag] = {
            "seconds": t, "setup_s": t_setup, "per_pick_s": per_pick, "per_pick_over_floor": per_pick / floor,
            "dist_evals": evals, "peak_extra_mb": mem, "picks": ids,
        }
        log(f"  ours {tag:6s}: {t:7.2f} s (setup {t_setup:.2f} s), {per_pick * 1e3:7.3f} ms/pick = "
            f"{per_pick / floor:5.2f} x floor, distance evaluations in picks {evals:,}, peak extra {mem:,.0f} MB")
        if prune:
            # Next round: the picks get labelled; the cached state makes the setup free.
            mask2 = mask.copy()
            mask2[ids] = True
            pool2 = PoolView(ids=pool.ids, features=X, labeled_mask=mask2)
            _, t2, _ = timed(s.select, pool2, 1, rng)
            res["next_round_first_pick_s"] = t2
            log(f"  next round, cached state: first pick after {t2 * 1e3:.2f} ms (cold setup {t_setup:.2f} s)")
    # Per-pick times, one pick at a time (robust to a busy machine: min and median).
    floor_med = float(np.median([best_of(lambda: X.max(), 1) for _ in range(21)]))
    for prune in (True, False):
        tag = "pruned" if prune else "dense"
        from asvp_ray.selection.coreset import KCenterShard
        from asvp_ray.pool.shards import LocalGroup, ShardHolder

        group = LocalGroup([ShardHolder(X, 0)])
        group.build("k", KCenterShard, [("euclidean", 16384)])
        reset, rows = group.call_one(0, "k", "sync_begin", mask, False)
        group.call_one(0, "k", "sync_end", rows)
        row, gpos = None, -1
        times = []
        for _ in range(min(n, args.step_picks)):
            t0 = time.perf_counter()
            _, gpos, row = group.call_one(0, "k", "step", row, gpos, prune)
            times.append(time.perf_counter() - t0)
        times = np.asarray(times[1:])
        res[tag].update(step_min_s=float(times.min()), step_median_s=float(np.median(times)),
                        step_min_over_floor=float(times.min() / floor), step_median_over_floor=float(np.median(times) / floor_med))
        log(f"  ours {tag:6s} one pick at a time ({len(times)} picks): min {times.min() * 1e3:.3f} ms = "
            f"{times.min() / floor:.2f} x floor (min), median {np.median(times) * 1e3:.3f} ms = "
            f"{np.median(times) / floor_med:.2f} x floor (median {floor_med * 1e3:.2f} ms)")
    res["read_floor_median_s"] = floor_med
    same = bool(np.array_equal(res["pruned"]["picks"], res["dense"]["picks"]))
    log(f"  pruned == dense: {same}; pruned evaluates {res['dense']['dist_evals'] / res['pruned']['dist_evals']:.1f}x fewer distances")

    ref_n = min(args.ref_picks, n)
    rt: dict = {}
    ref, t_ref, mem_ref = timed(reference_coreset, X, mask, ref_n, rt)
    ref_pp = (t_ref - rt["setup_s"]) / ref_n
    ref_total = rt["setup_s"] + ref_pp * n
    mism = first_mismatch(ref, res["pruned"]["picks"])
    res["reference"] = {"picks_run": ref_n, "seconds": t_ref, "setup_s": rt["setup_s"], "per_pick_s": ref_pp,
                        "peak_extra_mb": mem_ref, "identical_prefix": mism, "projected_s": ref_total}
    log(f"  reference: {ref_n} picks in {t_ref:.1f} s (setup {rt['setup_s']:.2f} s) = {ref_pp * 1e3:.1f} ms/pick "
        f"({ref_pp / floor:.0f} x floor), peak extra {mem_ref:,.0f} MB; identical picks: {mism}/{ref_n}")
    for tag in ("pruned", "dense"):
        r = res[tag]
        r["speedup_per_pick"] = ref_pp / r["per_pick_s"]
        r["speedup_total"] = ref_total / r["seconds"]
        log(f"  speed-up over the reference, {tag}: per pick {r['speedup_per_pick']:.0f}x, "
            f"{n} picks with setup {ref_total:.1f} s (projected) vs {r['seconds']:.2f} s = {r['speedup_total']:.0f}x")
    for tag in ("pruned", "dense"):
        res[tag]["picks"] = None
    out["coreset"] = res

    if big is not None:
        Xb, maskb = big
        floor_b = read_floor(Xb)
        k = args.big_ref_picks
        rt = {}
        ref_b, t_rb, mem_rb = timed(reference_coreset, Xb, maskb, k, rt)
        rb_pp = (t_rb - rt["setup_s"]) / k
        out["coreset_big_reference"] = {"rows": len(Xb), "picks_run": k, "seconds": t_rb, "setup_s": rt["setup_s"],
                                        "per_pick_s": rb_pp, "projected_s": rt["setup_s"] + rb_pp * n,
                                        "peak_extra_mb": mem_rb, "picks": ref_b}
        log(f"  reference at {len(Xb):,} rows: setup {rt['setup_s']:.1f} s, {rb_pp:.2f} s/pick over {k} picks "
            f"({rb_pp / floor_b:.0f} x floor), projected {rt['setup_s'] + rb_pp * n:,.0f} s for {n} picks; "
            f"peak extra {mem_rb:,.0f} MB")


def section_badge_reference(args, out: dict) -> None:
    N = args.badge_rows
    X, _ = clustered_features(N, args.dim, args.seed + 2, n_clusters=max(10, N // 1000))
    mask = initial_mask(N, args.labeled, args.seed)
    proxy = fit_proxy(X, proxy_labels(X, args.classes, args.seed), mask, args.classes, args.dim)
    log(f"\n== badge vs the reference: {N:,} rows, gradient embedding width {args.dim} x {args.classes}, {args.picks} picks")
    pool = PoolView(ids=np.arange(N, dtype=np.int64), features=X, labeled_mask=mask, model=proxy)
    s = STRATEGIES.create("badge", execution="local")
    ours, t_ours, mem_ours = timed(s.select, pool, args.picks, np.random.default_rng(7))
    un = pool.unlabeled_positions()
    h, p = proxy.embed_and_proba(X[un])
    E = gradient_embedding_parts(p)
    ref, t_ref, mem_ref = timed(reference_badge, E, h, args.picks, np.random.default_rng(7))
    ref = un[np.asarray(ref)]
    mism = first_mismatch(ref, ours)
    nn_mb = N * N * 4 / 2**20
    t_sel = s.last_timing_["select_s"]
    out["badge_reference"] = {
        "rows": N, "picks": args.picks, "ours_s": t_ours, "ours_select_s": t_sel, "ours_peak_extra_mb": mem_ours,
        "reference_s": t_ref, "reference_peak_extra_mb": mem_ref, "speedup_selection": t_ref / t_sel,
        "speedup_with_embeddings": t_ref / t_ours, "identical_prefix": mism, "nxn_matrix_mb": nn_mb,
    }
    log(f"  ours {t_sel:.2f} s from the embeddings ({t_ours:.2f} s computing them from the proxy too), peak extra "
        f"{mem_ours:,.0f} MB; reference {t_ref:.1f} s from the embeddings, peak extra {mem_ref:,.0f} MB "
        f"(an N x N float32 matrix is {nn_mb:,.0f} MB)")
    log(f"  speed-up {t_ref / t_sel:.0f}x ({t_ref / t_ours:.0f}x counting our embedding computation); "
        f"identical picks: {mism}/{args.picks}")


def section_badge_plain(args, pool: PoolView, out: dict, ours: Optional[dict]) -> None:
    N = len(pool)
    log(f"\n== badge vs the plain factorised form: {N:,} rows, {args.picks} picks")
    un = pool.unlabeled_positions()
    t0 = time.perf_counter()
    h = E = None
    for s in range(0, len(un), 65536):
        hh, pp = pool.model.embed_and_proba(pool.features[un[s : s + 65536]])
        if h is None:
            h = np.empty((len(un), hh.shape[1]), np.float32)
            E = np.empty((len(un), pp.shape[1]), np.float32)
        h[s : s + len(hh)] = hh
        E[s : s + len(hh)] = gradient_embedding_parts(pp)
    t_emb = time.perf_counter() - t0
    k = min(args.plain_picks, args.picks)
    plain, t_plain, mem_plain = timed(plain_badge, E, h, k, np.random.default_rng(3))
    del h, E
    gc.collect()
    pp = t_plain / k
    res = {"rows": N, "plain_picks_run": k, "plain_per_pick_s": pp, "plain_projected_s": pp * args.picks,
           "embeddings_s": t_emb, "plain_peak_extra_mb": mem_plain}
    if ours is None:
        s = STRATEGIES.create("badge", execution="local")
        ids, t, mem = timed(s.select, pool, args.picks, np.random.default_rng(3))
        ours = {"seconds": t, "peak_extra_mb": mem, "ids": ids, "stats": s.last_stats_, "timing": s.last_timing_}
    pos = ours["ids"]  # ids are positions here
    res.update(ours_s=ours["seconds"], ours_peak_extra_mb=ours["peak_extra_mb"],
               identical_prefix=first_mismatch(un[np.asarray(plain)], pos),
               ours_dist_evals=int(sum(st["dist_evals"] for st in ours["stats"])))
    ours_select = ours["timing"]["select_s"]  # both need the embeddings once
    res["ours_select_s"] = ours_select
    res["ours_embed_s"] = ours["timing"]["embed_s"]
    res["speedup_selection"] = pp * args.picks / max(ours_select, 1e-9)
    res["speedup_total"] = (pp * args.picks + t_emb) / ours["seconds"]
    log(f"  plain: {pp * 1e3:.1f} ms/pick over {k} picks -> {pp * args.picks:.0f} s for {args.picks}; embeddings {t_emb:.1f} s")
    log(f"  ours: {ours['seconds']:.1f} s in all ({ours_select:.1f} s after {res['ours_embed_s']:.1f} s of embeddings), distance evaluations "
        f"{res['ours_dist_evals']:,} vs {N * args.picks:,} plain; identical picks: {res['identical_prefix']}/{k}")
    log(f"  speed-up: selection {res['speedup_selection']:.1f}x, including embeddings {res['speedup_total']:.1f}x")
    out["badge_plain"] = res


def section_uncertainty(args, out: dict) -> None:
    res = {}
    for N in args.uncertainty_rows:
        rng = np.random.default_rng(args.seed + 5)
        probs = np.empty((N, args.classes), dtype=np.float32)
        for s in range(0, N, 1 << 20):
            e = min(s + (1 << 20), N)
            g = rng.standard_gamma(0.3, size=(e - s, args.classes)).astype(np.float32)
            probs[s:e] = g / g.sum(axis=1, keepdims=True)
        ids = np.arange(N, dtype=np.int64)
        mask = np.zeros(N, dtype=bool)
        pool = PoolView(ids=ids, labeled_mask=mask, probs=probs, chunk_size=1 << 18)
        strat = STRATEGIES.create("margin")
        n = args.picks
        picks, t_sel, mem_sel = timed(strat.select, pool, n, np.random.default_rng(0))
        scores = np.empty(N, dtype=np.float64)
        for s in range(0, N, 1 << 18):
            scores[s : s + (1 << 18)] = strat.score(probs[s : s + (1 << 18)])

        def by_sort():
            return np.argsort(-scores, kind="stable")[:n]

        def by_partition():
            keep = top_n(scores, ids, n)
            return keep[np.lexsort((ids[keep], -scores[keep]))]

        t_sort = best_of(by_sort, 3)
        t_part = best_of(by_partition, 3)
        same = bool(np.array_equal(by_sort(), by_partition()) and np.array_equal(by_sort(), picks))
        res[str(N)] = {"select_s": t_sel, "select_peak_extra_mb": mem_sel, "sort_s": t_sort, "partition_s": t_part,
                       "speedup": t_sort / t_part, "same_picks": same}
        log(f"\n== uncertainty (margin) over {N:,} rows, top {n}: select {t_sel:.2f} s (scoring included, peak extra "
            f"{mem_sel:,.0f} MB); on the scores: full sort {t_sort * 1e3:.0f} ms, partial selection "
            f"{t_part * 1e3:.1f} ms = {t_sort / t_part:.0f}x; same picks: {same}")
        del probs, scores, pool
        gc.collect()
    out["uncertainty"] = res


def calibrate_delta(X: np.ndarray, k: int, queries: int, seed: int) -> float:
    """Median distance (unit-length rows) to the k-th nearest neighbour of sampled rows."""
    rng = np.random.default_rng(seed)
    q = np.ascontiguousarray(X[np.sort(rng.choice(len(X), queries, replace=False))])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    kth = np.full((queries, k + 1), np.inf, dtype=np.float32)
    for s in range(0, len(X), 65536):
        xb = X[s : s + 65536]
        xb = xb / np.linalg.norm(xb, axis=1, keepdims=True)
        d = 2.0 - 2.0 * (q @ xb.T)
        kth = np.sort(np.concatenate([kth, d], axis=1), axis=1)[:, : k + 1]
    return float(np.sqrt(np.median(np.maximum(kth[:, k], 0))))


def section_probcover_graph(args, X: np.ndarray, out: dict):
    N = len(X)
    delta = args.delta or calibrate_delta(X, 20, 200, args.seed)
    log(f"\n== probcover graph: {N:,} x {X.shape[1]}, delta {delta:.4f} (median 20th-neighbour distance), "
        f"IVF nprobe {args.nprobe}")
    strat = STRATEGIES.create("probcover", delta=delta, graph="ivf", nprobe=args.nprobe)
    g, t, mem = timed(strat.build_graph, X)
    res = {"rows": N, "delta": delta, "build_s": t, "peak_extra_mb": mem, **{k: v for k, v in g.stats.items()}}
    log(f"  IVF graph: {t:.1f} s, {g.stats['nlist']} cells, {g.stats['mean_probes']:.2f} cells searched per row "
        f"({g.stats['truncated_rows'] / N:.2%} of rows capped at nprobe), mean degree {g.stats['mean_degree']:.1f} "
        f"(self included), {g.n_edges:,} edges ({(g.indices.nbytes + g.indptr.nbytes) / 2**20:,.0f} MB), "
        f"peak extra {mem:,.0f} MB; pairs computed {g.stats['pairs_computed'] / N**2:.4f} of N^2")
    # Recall 1: a random subset, exact versus IVF (same nprobe, cells scaled to the subset).
    m = min(args.recall_sample, N)
    sub = np.sort(np.random.default_rng(args.seed + 9).choice(N, m, replace=False))
    Xs = np.ascontiguousarray(X[sub])
    t0 = time.perf_counter()
    exact = delta_graph(Xs, delta, "exact")
    t_exact = time.perf_counter() - t0
    approx = delta_graph(Xs, delta, "ivf", nprobe=args.nprobe)
    rec = graph_recall(approx, exact)
    res.update(recall_subset=rec, recall_subset_rows=m, exact_subset_s=t_exact,
               exact_full_projected_h=t_exact * (N / m) ** 2 / 3600)
    log(f"  recall on a {m:,}-row subset (exact graph {t_exact:.1f} s, mean degree {exact.stats['mean_degree']:.2f}): "
        f"{rec:.4f}; the exact graph of all {N:,} rows would take ~{res['exact_full_projected_h']:.1f} h here")
    # Recall 2: sampled rows' neighbourhoods in the full graph, against exact ones.
    q = np.sort(np.random.default_rng(args.seed + 10).choice(N, args.recall_queries, replace=False))
    xs = np.ascontiguousarray(X[q]); xs /= np.linalg.norm(xs, axis=1, keepdims=True)
    found = total = 0
    for s in range(0, N, 65536):
        xb = X[s : s + 65536]
        xb = xb / np.linalg.norm(xb, axis=1, keepdims=True)
        i, j = np.nonzero(2.0 - 2.0 * (xs @ xb.T) < delta**2)
        j = j + s
        keep = q[i] != j
        i, j = i[keep], j[keep]
        total += len(i)
        for qi in np.unique(i):
            row = g.indices[g.indptr[q[qi]] : g.indptr[q[qi] + 1]]
            found += int(np.isin(j[i == qi], row).sum())
    res["recall_queries"] = found / max(total, 1)
    res["recall_queries_n"] = int(args.recall_queries)
    log(f"  recall of {args.recall_queries} sampled rows' neighbourhoods against exact search over all rows: "
        f"{res['recall_queries']:.4f} ({total:,} true edges)")
    out["probcover_graph"] = res
    return strat


def section_strategies(args, X, y, mask, out: dict, probcover=None) -> dict:
    N = len(X)
    log(f"\n== every strategy on {N:,} x {X.shape[1]} ({N * X.shape[1] * 4 / 2**30:.1f} GiB), {mask.sum()} labelled, "
        f"{args.picks} picks (MLP proxy, hidden {args.dim}, {args.classes} classes)")
    proxy = fit_proxy(X, y, mask, args.classes, args.dim)
    pool = PoolView(ids=np.arange(N, dtype=np.int64), features=X, labeled_mask=mask, model=proxy, chunk_size=65536)
    res = {}
    extra = {}
    names = [n for n in args.strategies]
    for name in names:
        if name == "probcover":
            strat = probcover or STRATEGIES.create("probcover", delta=args.delta or 0.75, nprobe=args.nprobe)
        elif name in ("coreset", "badge"):
            strat = STRATEGIES.create(name, execution="local")
        else:
            strat = STRATEGIES.create(name)
        ids, t, mem = timed(strat.select, pool, args.picks, np.random.default_rng(3))
        assert len(np.unique(ids)) == args.picks and not mask[ids].any()
        res[name] = {"seconds": t, "peak_extra_mb": mem}
        note = ""
        if name == "probcover" and probcover is not None:
            note = " (graph cached from the graph section)"
        log(f"  {name:17s} {t:8.2f} s   peak extra {mem:8,.0f} MB{note}")
        if name == "badge":
            extra["badge"] = {"seconds": t, "peak_extra_mb": mem, "ids": ids, "stats": strat.last_stats_,
                              "timing": strat.last_timing_}
        if name == "coreset":
            extra["coreset"] = {"seconds": t, "ids": ids}
        del strat
        gc.collect()
    out["strategies"] = {"rows": N, "dim": X.shape[1], "picks": args.picks, "results": res}
    extra["pool"] = pool
    return extra


def section_sharded(args, out: dict) -> None:
    import ray
    from ray.cluster_utils import Cluster

    N = args.shard_rows
    X, _ = clustered_features(N, args.dim, args.seed + 3)
    mask = initial_mask(N, args.labeled, args.seed)
    pool = PoolView(ids=np.arange(N, dtype=np.int64), features=X, labeled_mask=mask)
    log(f"\n== sharded coreset on a two-node local Ray cluster: {N:,} x {args.dim}, {args.picks} picks")
    local = STRATEGIES.create("coreset", execution="local")
    a, t_local, _ = timed(local.select, pool, args.picks, np.random.default_rng(0))
    store = int(N * args.dim * 4 * 0.75) + (256 << 20)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": store})
    cluster.add_node(num_cpus=1, object_store_memory=store)
    try:
        ray.init(address=cluster.address, include_dashboard=False, logging_level="ERROR")
        sh = STRATEGIES.create("coreset", execution="sharded", num_shards=2)
        t0 = time.perf_counter()
        sh._actor_shards(X, N)
        t_ship = time.perf_counter() - t0
        nodes = len(set(sh._shards.group.node_ids()))
        b, t_sh, _ = timed(sh.select, pool, args.picks, np.random.default_rng(0))
        mask2 = mask.copy()
        mask2[b] = True
        pool2 = PoolView(ids=pool.ids, features=X, labeled_mask=mask2)
        a2, t_l2, _ = timed(local.select, pool2, args.picks, np.random.default_rng(1))
        b2, t_s2, _ = timed(sh.select, pool2, args.picks, np.random.default_rng(1))
        sh.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
    same = bool(np.array_equal(a, b) and np.array_equal(a2, b2))
    out["sharded"] = {"rows": N, "picks": args.picks, "nodes": nodes, "local_s": t_local, "sharded_s": t_sh,
                      "ship_s": t_ship, "round2_local_s": t_l2, "round2_sharded_s": t_s2, "same_picks": same}
    log(f"  shards on {nodes} nodes (data shipped in {t_ship:.1f} s); round 1: local {t_local:.1f} s, sharded "
        f"{t_sh:.1f} s; round 2 (cached state): local {t_l2:.1f} s, sharded {t_s2:.1f} s; same picks: {same}")


# ============================================================================ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="reduced sizes for a quick run")
    ap.add_argument("--sections", default="coreset,badge,uncertainty,probcover,strategies,sharded")
    ap.add_argument("--rows", type=int, default=1_000_000, help="large pool rows")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--picks", type=int, default=1000)
    ap.add_argument("--labeled", type=int, default=100, help="initially labelled rows")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--coreset-rows", type=int, default=50_000)
    ap.add_argument("--ref-picks", type=int, default=300, help="picks run by the reference coreset loop")
    ap.add_argument("--step-picks", type=int, default=200, help="coreset picks timed one at a time")
    ap.add_argument("--big-ref-picks", type=int, default=3, help="reference coreset picks timed at --rows")
    ap.add_argument("--badge-rows", type=int, default=20_000)
    ap.add_argument("--plain-picks", type=int, default=20, help="plain factorised BADGE picks timed at --rows")
    ap.add_argument("--uncertainty-rows", default="1000000,10000000")
    ap.add_argument("--delta", type=float, default=None, help="probcover delta (default: calibrated)")
    ap.add_argument("--nprobe", type=int, default=4)
    ap.add_argument("--recall-sample", type=int, default=50_000)
    ap.add_argument("--recall-queries", type=int, default=300)
    ap.add_argument("--shard-rows", type=int, default=1_000_000)
    ap.add_argument("--strategies", default="random,margin,entropy,least_confidence,coreset,badge,typiclust,probcover")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--threads", type=int, default=None, help="BLAS / torch / faiss threads (default: all cores)")
    args = ap.parse_args(argv)
    if args.threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
        torch.set_num_threads(args.threads)
        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            pass
    if args.small:
        args.rows, args.coreset_rows, args.badge_rows, args.picks = 100_000, 20_000, 5_000, 300
        args.ref_picks, args.uncertainty_rows, args.recall_sample, args.shard_rows = 100, "1000000", 10_000, 100_000
    args.uncertainty_rows = [int(x) for x in str(args.uncertainty_rows).split(",") if x]
    args.strategies = [s for s in args.strategies.split(",") if s]
    sections = set(args.sections.split(","))

    log(f"numpy {np.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}")
    out: Dict[str, object] = {"args": {k: v for k, v in vars(args).items()}}
    t_all = time.perf_counter()

    big = None
    if sections & {"coreset", "probcover", "strategies", "badge"}:
        t0 = time.perf_counter()
        Xb, _ = clustered_features(args.rows, args.dim, args.seed)
        yb = proxy_labels(Xb, args.classes, args.seed)
        maskb = initial_mask(args.rows, args.labeled, args.seed)
        log(f"large pool: {args.rows:,} x {args.dim} ({Xb.nbytes / 2**30:.2f} GiB) made in {time.perf_counter() - t0:.1f} s")
        big = (Xb, maskb)

    if "coreset" in sections:
        X, _ = clustered_features(args.coreset_rows, args.dim, args.seed + 1, n_clusters=max(10, args.coreset_rows // 1000))
        section_coreset(args, X, initial_mask(args.coreset_rows, args.labeled, args.seed), big, out)
        del X
        gc.collect()
    if "uncertainty" in sections:
        section_uncertainty(args, out)
    probcover = None
    if "probcover" in sections:
        probcover = section_probcover_graph(args, big[0], out)
    extra = {}
    if "strategies" in sections:
        extra = section_strategies(args, big[0], yb, big[1], out, probcover)
        if "coreset" in extra and "coreset_big_reference" in out:
            r = out["coreset_big_reference"]
            ours = extra["coreset"]
            ratio = r["projected_s"] / ours["seconds"]
            same = first_mismatch(r["picks"], ours["ids"])
            out["coreset_big_reference"].update(speedup=ratio, identical_prefix=same, picks=None)
            log(f"\n== coreset at {args.rows:,} rows: reference projected {r['projected_s']:,.0f} s for "
                f"{args.picks} picks vs ours {ours['seconds']:.1f} s (setup included) = {ratio:.0f}x; "
                f"identical picks: {same}/{r['picks_run']}")
    probcover = None
    if "badge" in sections:
        section_badge_reference(args, out)
        pool = extra.get("pool")
        if pool is None:
            proxy = fit_proxy(big[0], yb, big[1], args.classes, args.dim)
            pool = PoolView(ids=np.arange(args.rows, dtype=np.int64), features=big[0], labeled_mask=big[1], model=proxy)
        section_badge_plain(args, pool, out, extra.get("badge"))
        pool = None
    extra = big = Xb = yb = maskb = None
    gc.collect()
    if "sharded" in sections:
        section_sharded(args, out)
    out["total_s"] = time.perf_counter() - t_all
    log(f"\ntotal {out['total_s']:.0f} s, load average {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=lambda o: None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
