"""BADGE on features (Ash et al., 2020).

**badge** (Ash et al., 2020): k-means++ seeding on gradient embeddings
``g_i = (p_i - onehot(argmax p_i)) (x) h_i``. With ``e_i = p_i - onehot(argmax p_i)``,
``||g_i - g_j||^2 = ||e_i||^2 ||h_i||^2 + ||e_j||^2 ||h_j||^2 - 2 (e_i . e_j)(h_i . h_j)``,
so a distance costs O(H + C), never O(H x C). A new centre can lower a row's D^2 only if
their distance is below it, and Cauchy-Schwarz on h bounds that distance from below by
``||g_i||^2 + ||g_c||^2 - 2 |e_i . e_c| ||h_i|| ||h_c||``, which costs O(C): the O(H)
products are computed only for the rows the bound cannot rule out, in one fused chunked pass.

It runs on one in-process shard or on shards held by Ray actors
(:mod:`asvp_ray.selection.sharded`), with the same code and the same picks.
"""
from __future__ import annotations

import time
from typing import Any, List, Optional, Tuple

import numpy as np

from asvp_ray.core.errors import BadInputError, ConfigError
from asvp_ray.pool.shards import LocalGroup, ShardHolder
from asvp_ray.pool.view import PoolView
from asvp_ray.selection._common import chunk_rows, first_bad_row, need_features, row_sqnorms
from asvp_ray.selection.base import STRATEGIES, Strategy
from asvp_ray.selection.sharded import DEFAULT_SHARD_MIN_ROWS, ShardedExecution

FIRST_CENTRE = ("random", "max_norm")


def gradient_embedding_sqdist(e: np.ndarray, h: np.ndarray, e_c: np.ndarray, h_c: np.ndarray) -> np.ndarray:
    """Squared distances ``||g_i - g_c||^2`` of gradient embeddings, never forming g.

    Args:
        e: float (m, C) rows ``p_i - onehot(argmax p_i)``.
        h: float (m, H) hidden activations.
        e_c: float (C,) and h_c: float (H,) of the centre.

    Returns:
        float64 (m,) ``||e_i||^2 ||h_i||^2 + ||e_c||^2 ||h_c||^2 - 2 (e_i . e_c)(h_i . h_c)``,
        clipped at 0.
    """
    e = np.asarray(e)
    h = np.asarray(h)
    a = row_sqnorms(e) * row_sqnorms(h)
    a_c = float(row_sqnorms(np.asarray(e_c)[None])[0] * row_sqnorms(np.asarray(h_c)[None])[0])
    d = a + a_c - 2.0 * (e @ e_c).astype(np.float64) * (h @ h_c).astype(np.float64)
    return np.maximum(d, 0.0)


def gradient_embedding_parts(probs: np.ndarray) -> np.ndarray:
    """``e = p - onehot(argmax p)`` (ties: the first class), float32 (m, C)."""
    e = np.array(probs, dtype=np.float32)
    e[np.arange(len(e)), np.argmax(e, axis=1)] -= 1.0
    return e


def _embed_rows(features, mask: np.ndarray, probs, model, chunk: int, start: int) -> Tuple[np.ndarray, np.ndarray]:
    """(E, H) of the unlabelled rows (``~mask``), in position order: float32 (m, C), (m, H).

    The model runs on contiguous row blocks (labelled rows included, then dropped), so no
    block of features is gathered.
    """
    E = Hh = None
    use_model_hidden = model is not None and hasattr(model, "hidden_activations")
    n_rows = len(mask)
    m = int(n_rows - np.count_nonzero(mask))
    at = 0
    for s in range(0, n_rows, chunk):
        sl = slice(s, min(s + chunk, n_rows))
        keep = ~mask[sl]
        if not keep.any():
            continue
        xb = features[sl] if features.shape[1] else None
        if probs is not None:
            p = np.asarray(probs[sl])
            h = model.hidden_activations(xb) if use_model_hidden else xb
        elif hasattr(model, "embed_and_proba"):
            h, p = model.embed_and_proba(xb)
        else:
            p = model.predict_proba(xb)
            h = model.hidden_activations(xb) if use_model_hidden else xb
        if h is None:
            raise BadInputError("badge needs PoolView.features (or a model with hidden_activations)")
        p = np.asarray(p)
        h = np.asarray(h)
        b = sl.stop - sl.start
        if p.ndim != 2 or p.shape[0] != b or h.ndim != 2 or h.shape[0] != b:
            raise BadInputError(
                f"badge: probabilities {p.shape} / hidden activations {h.shape} for {b} rows; "
                f"expected ({b}, C) and ({b}, H)"
            )
        all_kept = bool(keep.all())
        if not all_kept:
            p, h = p[keep], h[keep]
        ok = np.isfinite(p).all(axis=1)
        if not ok.all():
            rows = np.flatnonzero(keep)
            raise BadInputError(
                f"badge: non-finite class probabilities at pool row {start + s + int(rows[np.flatnonzero(~ok)[0]])}; "
                f"clean or re-extract those features"
            )
        if E is None:
            E = np.empty((m, p.shape[1]), dtype=np.float32)
            Hh = np.empty((m, h.shape[1]), dtype=np.float32)
        E[at : at + len(p)] = gradient_embedding_parts(p)
        Hh[at : at + len(p)] = h
        at += len(p)
    if E is None:
        E = np.empty((0, 1), np.float32)
        Hh = np.empty((0, max(features.shape[1], 1)), np.float32)
    return E, Hh


class GradEmbShard:
    """k-means++ state on gradient embeddings of one shard's unlabelled rows.

    A new centre c can lower ``D^2_i`` only if ``d(i, c)^2 < D^2_i``. By Cauchy-Schwarz on h,
    ``d(i, c)^2 >= ||g_i||^2 + ||g_c||^2 - 2 |e_i . e_c| ||h_i|| ||h_c||``: one (N x C)
    product gives this bound for every row, and the (rows x H) product is computed only for
    the rows the bound cannot rule out (confident rows of other classes never pass). With
    many classes (C > H / 4) the cheaper norm bound ``(||g_i|| - ||g_c||)^2`` is used.

    The bound needs only the (N x C) product and three per-row numbers; the row's slack
    ``D^2_i - ||g_i||^2`` is kept up to date with D^2, so the test is one multiply-add per row.

    Args:
        features: (m, D) rows of the shard.
        start: pool position of the shard's first row.
        mask: bool (m,) labelled rows of the shard (excluded).
        probs: (m, C) probabilities of the shard's rows, or None (then ``model`` gives them).
        model: proxy with ``predict_proba`` and optionally ``hidden_activations`` /
            ``embed_and_proba``; without hidden activations the features are h.
        chunk_rows: rows per embedding / distance chunk.
        block: rows per block of the D^2 weight sums.
        dense_fraction: above this fraction of candidate rows, a chunk is read whole.
    """

    def __init__(
        self,
        features: np.ndarray,
        start: int,
        mask: np.ndarray,
        probs: Optional[np.ndarray],
        model: Any,
        chunk_rows: int,
        block: int = 2048,
        dense_fraction: float = 0.5,
    ):
        self.start = int(start)
        mask = np.asarray(mask, dtype=bool)
        self.rows = np.flatnonzero(~mask).astype(np.int64)
        E, H = _embed_rows(features, mask, probs, model, chunk_rows, self.start)
        self.mu = len(self.rows)
        self.B = int(block)
        self.chunk = max(self.B, int(chunk_rows) - int(chunk_rows) % self.B)
        self.dense_fraction = float(dense_fraction)
        self.E, self.H = E, H
        hn = np.sqrt(row_sqnorms(H))
        if not np.isfinite(hn).all():
            bad = self.start + int(self.rows[first_bad_row(hn)])
            raise BadInputError(
                f"badge: non-finite hidden activations (or features) at pool row {bad}; clean or re-extract those features"
            )
        self.a = row_sqnorms(E) * hn**2  # ||g||^2
        self.hn2 = 2.0 * (1.0 + 1e-5) * hn  # loosened by 1e-5 against float32 rounding
        self.gn2 = 2.0 * (1.0 + 1e-5) * np.sqrt(self.a)
        self.use_class_bound = 4 * E.shape[1] <= H.shape[1]
        self.slack = -self.a  # D^2 - ||g||^2
        self.valid = np.ones(self.mu, dtype=bool)
        self.n_valid = self.mu
        self.nb = max(1, -(-self.mu // self.B))
        self.W = np.zeros(self.nb * self.B, dtype=np.float64)  # D^2, padded to whole blocks
        self.D2 = self.W[: self.mu]  # min squared distance to the centres; 0 for taken rows
        self.bsum = np.zeros(self.nb, dtype=np.float64)
        self.k = 0
        #: full distance evaluations (rows x centres), for benchmarks.
        self.dist_evals = 0

    # ------------------------------------------------------------------ weights
    def _set_d2(self, u: np.ndarray, d: np.ndarray) -> None:
        """Set D^2 of rows u and refresh the touched block sums."""
        self.D2[u] = d
        self.slack[u] = d - self.a[u]
        Wb = self.W.reshape(self.nb, self.B)
        if len(u) * 4 > self.nb:
            self.bsum = Wb.sum(axis=1)
        else:
            blocks = np.unique(u // self.B)
            self.bsum[blocks] = Wb[blocks].sum(axis=1)

    def total(self) -> float:
        return float(self.bsum.sum())

    # ------------------------------------------------------------------ protocol (driver calls)
    def valid_count(self) -> int:
        return self.n_valid

    def take(self, u: int) -> Tuple[int, np.ndarray, np.ndarray, float]:
        """Remove row ``u`` from the candidates; returns (pool position, e, h, ||g||^2)."""
        u = int(u)
        if self.valid[u]:
            self.valid[u] = False
            self.n_valid -= 1
            self._set_d2(np.array([u]), np.zeros(1))
        return self.start + int(self.rows[u]), self.E[u].copy(), self.H[u].copy(), float(self.a[u])

    def take_nth(self, r: int):
        """Take the r-th valid row (position order)."""
        return self.take(int(np.flatnonzero(self.valid)[int(r)]))

    def max_norm(self) -> Tuple[float, int]:
        """(largest ||g||^2, its pool position) among valid rows, ties to the lower row."""
        if self.n_valid == 0:
            return -np.inf, -1
        a = np.where(self.valid, self.a, -np.inf)
        u = int(np.argmax(a))
        return float(a[u]), self.start + int(self.rows[u])

    def take_pos(self, gpos: int):
        """Take the row at pool position ``gpos``."""
        return self.take(int(np.searchsorted(self.rows, int(gpos) - self.start)))

    def take_at(self, target: float):
        """Take the row where the running sum of D^2 (position order) first exceeds ``target``."""
        cb = np.cumsum(self.bsum)
        b = int(np.searchsorted(cb, target, side="right"))
        if b >= self.nb:  # rounding put the target at the very end
            b = int(np.flatnonzero(self.bsum > 0)[-1])
        rem = target - (cb[b - 1] if b else 0.0)
        w = self.W[b * self.B : (b + 1) * self.B]
        i = int(np.searchsorted(np.cumsum(w), rem, side="right"))
        if i >= len(w) or w[i] <= 0:
            i = int(np.flatnonzero(w > 0)[-1])
        return self.take(b * self.B + i)

    # ------------------------------------------------------------------ distances
    def _dist(self, sl_or_idx, ee: np.ndarray, h: np.ndarray, a: float) -> np.ndarray:
        d = ee.astype(np.float64)
        d *= self.H[sl_or_idx] @ h
        d *= -2.0
        d += self.a[sl_or_idx]
        d += a
        np.maximum(d, 0.0, out=d)
        return d

    def add_centre(self, e: np.ndarray, h: np.ndarray, a: float) -> float:
        """Add a centre and lower D^2 exactly; returns the shard's total D^2 weight.

        One fused pass over row chunks (cache-sized): class-factor products, the lower bound,
        and hidden products only for the rows the bound keeps.
        """
        e = np.asarray(e, dtype=np.float32)
        h = np.asarray(h, dtype=np.float32)
        a = float(a)
        if self.k == 0:
            d = np.empty(self.mu, dtype=np.float64)
            for s in range(0, self.mu, self.chunk):
                sl = slice(s, min(s + self.chunk, self.mu))
                d[sl] = self._dist(sl, self.E[sl] @ e, h, a)
            self.dist_evals += self.mu
            d[~self.valid] = 0.0
            self._set_d2(np.arange(self.mu), d)
            self.k = 1
            return self.total()
        hc = np.float32(np.sqrt(row_sqnorms(h[None])[0]))
        gc = np.float32(np.sqrt(a))
        buf = np.empty(min(self.chunk, self.mu), dtype=np.float64)
        moved_j, moved_d = [], []
        for s in range(0, self.mu, self.chunk):
            e_ = min(s + self.chunk, self.mu)
            ee = self.E[s:e_] @ e
            # Row i can move only if ||g_i||^2 + ||g_c||^2 - 2 |e_i.e_c| ||h_i|| ||h_c|| < D^2_i,
            # i.e. 2 |e_i.e_c| ||h_i|| ||h_c|| + (D^2_i - ||g_i||^2) > ||g_c||^2.
            lb = buf[: e_ - s]
            if self.use_class_bound:
                t = np.abs(ee)
                t *= hc
                np.multiply(t, self.hn2[s:e_], out=lb)
            else:
                np.multiply(self.gn2[s:e_], gc, out=lb)
            lb += self.slack[s:e_]
            cand = np.flatnonzero(lb > a)
            if len(cand) == 0:
                continue
            if len(cand) > self.dense_fraction * (e_ - s):
                d = self._dist(slice(s, e_), ee, h, a)[cand]  # contiguous beats a large gather
                self.dist_evals += e_ - s
            else:
                d = self._dist(s + cand, ee[cand], h, a)
                self.dist_evals += len(cand)
            sel = np.flatnonzero(d < self.D2[s + cand])
            if len(sel):
                moved_j.append(s + cand[sel])
                moved_d.append(d[sel])
        if moved_j:
            self._set_d2(np.concatenate(moved_j), np.concatenate(moved_d))
        self.k += 1
        return self.total()

    def stats(self) -> dict:
        return {"dist_evals": int(self.dist_evals), "centres": int(self.k), "rows": int(self.mu)}


def kmeanspp_select(group, name: str, n: int, rng: np.random.Generator, first: str) -> Tuple[np.ndarray, List[dict]]:
    """k-means++ seeding over the shards of ``group``.

    The first centre is drawn uniformly (``rng.integers`` over the unlabelled rows in position
    order) or is the largest ``||g||``; each further centre is the row where the running sum
    of D^2 in position order first exceeds ``rng.random() * total`` (``Generator.choice`` with
    ``p = D^2 / total`` draws the same row). When every D^2 is 0 (the remaining rows coincide
    with centres), the next centre is drawn uniformly among the remaining rows.

    Returns:
        (int64 (n,) pool positions in pick order, per-shard stats).
    """
    counts = group.call_all(name, "valid_count")

    def take_nth(r: int):
        cum = np.cumsum(counts)
        i = int(np.searchsorted(cum, r, side="right"))
        return group.call_one(i, name, "take_nth", r - (int(cum[i - 1]) if i else 0))

    if first == "random":
        cur = take_nth(int(rng.integers(int(sum(counts)))))
    else:
        res = group.call_all(name, "max_norm")
        _, gpos = max(((v, -p) for v, p in res if p >= 0))
        gpos = -gpos
        i = next(i for i, (s, e) in enumerate(group.bounds) if s <= gpos < e)
        cur = group.call_one(i, name, "take_pos", gpos)
    picks = [int(cur[0])]
    while len(picks) < n:
        _, e, h, a = cur
        totals = np.asarray(group.call_all(name, "add_centre", common=(e, h, a)), dtype=np.float64)
        total = float(totals.sum())
        if total > 0 and np.isfinite(total):
            target = float(rng.random()) * total
            cum = np.cumsum(totals)
            i = int(np.searchsorted(cum, target, side="right"))
            if i >= len(totals):
                i = int(np.flatnonzero(totals > 0)[-1])
            cur = group.call_one(i, name, "take_at", target - (float(cum[i - 1]) if i else 0.0))
        else:
            counts = group.call_all(name, "valid_count")
            cur = take_nth(int(rng.integers(int(sum(counts)))))
        picks.append(int(cur[0]))
    return np.asarray(picks, dtype=np.int64), group.call_all(name, "stats")


@STRATEGIES.register("badge")
class BadgeSampling(ShardedExecution, Strategy):
    """BADGE: k-means++ seeding on gradient embeddings (p - onehot(argmax p)) (x) h.

    h is the proxy's hidden activation (``model.hidden_activations``; for a linear proxy the
    normalised input), or the feature itself when the model has none. Probabilities come from
    ``PoolView.probs`` when given, else from the model. Only the unlabelled rows take part.

    Args:
        first: first centre: "random" (uniform, k-means++ and the paper's reference code) or
            "max_norm" (largest gradient embedding, Ash et al.'s code).
        execution: "local", "sharded" or "auto" (see :class:`CoresetSampling`).
        num_shards: shards when sharded; None means one per alive Ray node (at least 2).
        shard_min_rows: pool size from which "auto" shards.
        actor_options: Ray options of the shard actors (default ``{"num_cpus": 1}``).
    """

    name = "badge"
    _CACHE_ATTRS = ("_shards", "_local")

    def __init__(
        self,
        first: str = "random",
        execution: str = "auto",
        num_shards: Optional[int] = None,
        shard_min_rows: int = DEFAULT_SHARD_MIN_ROWS,
        actor_options: Optional[dict] = None,
    ):
        self.first = first
        self._init_execution(execution, num_shards, shard_min_rows, actor_options)
        self._local = None
        self.last_stats_: List[dict] = []
        self.last_timing_: dict = {}

    def _select_positions(self, pool: PoolView, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.first not in FIRST_CENTRE:
            raise ConfigError(f"badge: first={self.first!r} is not one of {', '.join(FIRST_CENTRE)}")
        self._check_exec()
        features = need_features("badge", pool, sharded_ok=True)
        if pool.probs is None and pool.model is None:
            raise BadInputError(
                "badge needs class probabilities: give PoolView.probs, or a fitted PoolView.model "
                "(hidden activations come from the model, else the features are used)"
            )
        chunk = chunk_rows(pool)
        if self._pool_resolve(pool) == "sharded":
            group = self._pool_shards(pool, features).group
        else:
            group = LocalGroup([ShardHolder(features, 0)])
        args = []
        for s, e in group.bounds:
            probs = pool.probs[s:e] if pool.probs is not None else None
            model = pool.model if (pool.probs is None or hasattr(pool.model, "hidden_activations")) else None
            args.append((pool.labeled_mask[s:e], probs, model, chunk))
        t0 = time.perf_counter()
        group.build("badge", GradEmbShard, args)
        t1 = time.perf_counter()
        try:
            picks, self.last_stats_ = kmeanspp_select(group, "badge", n, rng, self.first)
            self.last_timing_ = {"embed_s": t1 - t0, "select_s": time.perf_counter() - t1}
        finally:
            # The embeddings belong to this round's model: free them now.
            group.drop("badge")
        return picks

    def __repr__(self) -> str:
        return f"BadgeSampling(first={self.first!r}, execution={self.execution!r})"
