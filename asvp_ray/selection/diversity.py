"""Diversity and hybrid strategies on features: k-center greedy coreset and BADGE.

Both are exact with respect to their definitions and memory-bounded: no N x k or N x N
matrix, no per-pick copy of the pool, no materialised gradient embedding.

**coreset** (Sener & Savarese, 2018): greedily pick the unlabelled point farthest from the
labelled set and the points picked so far. One upper-bound vector ``ub`` (N,) holds, per row,
the minimum distance to the centres it has been compared with. Minimum distances only shrink
as centres are added, so a stale bound is still an upper bound: the pick is found by
refreshing only the rows at the top of ``ub`` until the best refreshed value beats every
remaining bound (``prune=True``). The refreshes are small matrix products (rows x the centres
they have not seen), so most of the pool is not read at all for most picks. ``prune=False``
refreshes every row for every pick in one fused, chunked pass (the memory-bandwidth floor).
The vector lives on the strategy object between rounds, keyed by the feature version, and
rows labelled by anyone in between are added as centres lazily; a round's setup is free.

**badge** (Ash et al., 2020): k-means++ seeding on gradient embeddings
``g_i = (p_i - onehot(argmax p_i)) (x) h_i``. With ``e_i = p_i - onehot(argmax p_i)``,
``||g_i - g_j||^2 = ||e_i||^2 ||h_i||^2 + ||e_j||^2 ||h_j||^2 - 2 (e_i . e_j)(h_i . h_j)``,
so a distance costs O(H + C), never O(H x C). A new centre can lower a row's D^2 only if
their distance is below it, and Cauchy-Schwarz on h bounds that distance from below by
``||g_i||^2 + ||g_c||^2 - 2 |e_i . e_c| ||h_i|| ||h_c||``, which costs O(C): the O(H)
products are computed only for the rows the bound cannot rule out, in one fused chunked pass.
The D^2 weights are kept with per-block sums, so each draw reads one block.

Both run on one in-process shard or on shards held by Ray actors
(:mod:`asvp_ray.selection.sharded`), with the same code and the same picks.
"""
from __future__ import annotations

import time
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from asvp_ray.errors import BadInputError, ConfigError
from asvp_ray.selection.base import STRATEGIES, PoolView, Strategy
from asvp_ray.selection.sharded import (
    DEFAULT_SHARD_MIN_ROWS,
    FeatureKey,
    LocalGroup,
    PoolShards,
    ShardHolder,
    check_execution,
    resolve_execution,
)

METRICS = ("euclidean", "cosine")
FIRST_CENTRE = ("random", "max_norm")
# Rows per distance pass chunk: (16384 x 512) float32 = 32 MiB, float64 scratch 128 KiB.
DISTANCE_CHUNK = 16384
# Elements of one (rows x centres) block of a refresh: 4 Mi -> 16 MiB float32 + 32 MiB float64.
BLOCK_ELEMENTS = 1 << 22


def _chunk_rows(pool: PoolView) -> int:
    return int(min(pool.chunk_size, DISTANCE_CHUNK))


def _need_features(where: str, pool: PoolView) -> np.ndarray:
    if pool.features is None:
        raise BadInputError(f"{where} needs PoolView.features; pass the pool's feature matrix")
    if not np.issubdtype(pool.features.dtype, np.floating):
        raise BadInputError(f"{where}: PoolView.features must be floating point, got {pool.features.dtype}")
    return pool.features


def _row_sqnorms(x: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Squared row norms in float64 (one definition for rows and centres, so d(x, x) = 0),
    computed in row chunks (no float64 copy of a large input)."""
    out = np.empty(len(x), dtype=np.float64)
    for s in range(0, len(x), chunk):
        xb = np.asarray(x[s : s + chunk]).astype(np.float64)
        out[s : s + chunk] = np.einsum("ij,ij->i", xb, xb)
    return out


def _first_bad_row(values: np.ndarray) -> int:
    return int(np.flatnonzero(~np.isfinite(values))[0])


# ============================================================================ coreset
class KCenterShard:
    """Greedy k-center state of one contiguous block of pool rows.

    Args:
        features: (m, D) rows ``[start, start + m)`` of the pool's features.
        start: pool position of the first row.
        metric: "euclidean" (squared distances are compared) or "cosine" (1 - cosine).
        chunk_rows: rows per chunk of a full pass.
        frontier: rows kept in the candidate frontier of the pruned search.
        batch: candidates refreshed at once by the pruned search.
    """

    def __init__(self, features: np.ndarray, start: int, metric: str, chunk_rows: int, frontier: int = 4096, batch: int = 64):
        self.X = features
        self.start = int(start)
        self.m = len(features)
        self.metric = metric
        self.chunk_rows = int(chunk_rows)
        self.frontier = int(frontier)
        self.batch = int(batch)
        self.ub: Optional[np.ndarray] = None
        self.ver: Optional[np.ndarray] = None
        self.centred: Optional[np.ndarray] = None
        self.k = 0
        self.n_valid = 0
        self._xs: Optional[np.ndarray] = None
        self._C = np.empty((0, features.shape[1]), dtype=np.float32)
        self._cs = np.empty(0, dtype=np.float64)
        self._front: Optional[np.ndarray] = None
        self._tau = np.inf
        self._pending = None
        #: distance evaluations (row, centre) so far, and those spent in round setups.
        self.dist_evals = 0
        self.setup_evals = 0

    # ------------------------------------------------------------------ geometry
    def _stats(self, x: np.ndarray, first_row: int) -> np.ndarray:
        sq = _row_sqnorms(x)
        if not np.isfinite(sq).all():
            bad = first_row + _first_bad_row(sq)
            raise BadInputError(
                f"coreset: feature row {bad} holds NaN/inf (or overflows); clean or re-extract the features"
            )
        if self.metric == "euclidean":
            return sq
        norm = np.sqrt(sq)
        with np.errstate(divide="ignore"):
            inv = np.where(norm > 0, 1.0 / norm, 0.0)  # a zero row is at cosine distance 1 from all
        return inv

    def _row_stats(self) -> np.ndarray:
        out = np.empty(self.m, dtype=np.float64)
        for s in range(0, self.m, self.chunk_rows):
            e = min(s + self.chunk_rows, self.m)
            out[s:e] = self._stats(self.X[s:e], self.start + s)
        return out

    def _combine(self, dots: np.ndarray, xs: np.ndarray, cs) -> np.ndarray:
        """Distances from float32 dot products and the float64 row/centre statistics."""
        d = dots.astype(np.float64)
        if self.metric == "euclidean":
            d *= -2.0
            d += xs[:, None] if d.ndim == 2 else xs
            d += cs
            np.maximum(d, 0.0, out=d)
        else:
            d *= xs[:, None] if d.ndim == 2 else xs
            d *= cs
            np.subtract(1.0, d, out=d)
        return d

    def _min_dist(self, xb: np.ndarray, xs: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Minimum distance of rows ``xb`` to centres ``[lo, hi)``, in centre blocks."""
        if hi - lo == 1:
            return self._combine(xb @ self._C[lo], xs, self._cs[lo])
        step = max(1, BLOCK_ELEMENTS // max(len(xb), 1))
        out = None
        for a in range(lo, hi, step):
            b = min(a + step, hi)
            d = self._combine(xb @ self._C[a:b].T, xs, self._cs[a:b]).min(axis=1)
            out = d if out is None else np.minimum(out, d, out=out)
        return out

    # ------------------------------------------------------------------ centres
    def _append_centres(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, self._C.shape[1])
        if not len(rows):
            return
        if not np.isfinite(rows).all():
            raise BadInputError("coreset: a labelled or picked feature row holds NaN/inf; clean or re-extract the features")
        stats = self._stats(rows, -1)
        need = self.k + len(rows)
        if need > len(self._C):
            cap = max(need, 2 * len(self._C), 64)
            C = np.empty((cap, self._C.shape[1]), dtype=np.float32)
            cs = np.empty(cap, dtype=np.float64)
            C[: self.k], cs[: self.k] = self._C[: self.k], self._cs[: self.k]
            self._C, self._cs = C, cs
        self._C[self.k : need] = rows
        self._cs[self.k : need] = stats
        had_none = self.k == 0
        self.k = need
        if had_none:
            # Every bound is +inf until the first centre: refresh all rows at once.
            self._dense_update()

    def _invalidate(self, local: np.ndarray) -> None:
        local = np.asarray(local, dtype=np.int64)
        live = local[self.ub[local] > -np.inf]
        self.ub[live] = -np.inf
        self.centred[local] = True
        self.n_valid -= len(live)

    # ------------------------------------------------------------------ refreshes
    def _dense_update(self) -> Tuple[float, int]:
        """Bring every row up to date with all centres; returns (max, argmax) over valid rows."""
        k = self.k
        lo = int(self.ver.min()) if self.m else k
        best_val, best_pos = -np.inf, -1
        if lo < k:
            for s in range(0, self.m, self.chunk_rows):
                e = min(s + self.chunk_rows, self.m)
                d = self._min_dist(self.X[s:e], self._xs[s:e], lo, k)
                u = self.ub[s:e]
                np.minimum(u, d, out=u)
                i = int(np.argmax(u))
                if u[i] > best_val:
                    best_val, best_pos = float(u[i]), s + i
            self.dist_evals += self.m * (k - lo)
            self.ver[:] = k
        elif self.m:
            best_pos = int(np.argmax(self.ub))
            best_val = float(self.ub[best_pos])
        if best_val == -np.inf:
            return -np.inf, -1
        return best_val, best_pos

    def _refine(self, pos: np.ndarray) -> None:
        """Catch rows ``pos`` up with the centres they have not been compared with."""
        k = self.k
        pos = np.sort(pos)
        lag = k - self.ver[pos].astype(np.int64)
        if lag.min() == lag.max():
            groups = [pos]
        else:
            # Rows of similar staleness share one product; at most 2x redundant comparisons.
            bucket = np.floor(np.log2(lag)).astype(np.int64)
            groups = [pos[bucket == b] for b in np.unique(bucket)]
        for g in groups:
            lo = int(self.ver[g].min())
            step = max(1, min(self.chunk_rows, BLOCK_ELEMENTS // (k - lo)))
            for a in range(0, len(g), step):
                rows = g[a : a + step]
                d = self._min_dist(self.X[rows], self._xs[rows], lo, k)
                self.ub[rows] = np.minimum(self.ub[rows], d)
            self.dist_evals += len(g) * (k - lo)
            self.ver[g] = k

    def _rebuild_front(self) -> bool:
        if self.n_valid == 0:
            return False
        f = min(self.frontier, self.n_valid)
        self._tau = float(np.partition(self.ub, self.m - f)[self.m - f])  # f-th largest bound
        self._front = np.flatnonzero(self.ub >= self._tau)
        return True

    def _lazy_best(self) -> Tuple[float, int]:
        k = self.k
        while True:
            F = self._front
            if F is None or not len(F):
                if not self._rebuild_front():
                    return -np.inf, -1
                F = self._front
            vals = self.ub[F]
            keep = vals >= self._tau
            if not keep.all():
                F, vals = F[keep], vals[keep]
                self._front = F
                if not len(F):
                    self._front = None
                    continue
            b = min(self.batch, len(F))
            t_b = vals[np.argpartition(vals, len(F) - b)[len(F) - b]]  # b-th largest bound in F
            cand = F[vals >= t_b]
            stale = cand[self.ver[cand] < k]
            if len(stale):
                self._refine(stale)
            cv = self.ub[cand]
            top = cv.max()
            # Rows outside ``cand`` have bounds < t_b (those outside F: < tau <= t_b), so an
            # exact candidate value >= t_b is the maximum; all its ties are in ``cand``.
            if top >= t_b:
                return float(top), int(cand[cv == top].min())

    def best(self, prune: bool) -> Tuple[float, int]:
        """Exact (max min-distance, local row) over valid rows, ties to the lower row."""
        if self.n_valid == 0:
            return -np.inf, -1
        if not prune:
            return self._dense_update()
        return self._lazy_best()

    # ------------------------------------------------------------------ protocol (driver calls)
    def sync_begin(self, mask: np.ndarray, force_reset: bool) -> Tuple[bool, np.ndarray]:
        """Compare the labelled rows with this shard's centres.

        Returns:
            ``(reset, rows)``: whether the state must be rebuilt (first use, or a centre is no
            longer labelled), and the feature rows the driver must broadcast as new centres
            (all labelled rows on a reset, else only the newly labelled ones).
        """
        mask = np.asarray(mask, dtype=bool)
        reset = bool(force_reset or self.ub is None or (self.centred & ~mask).any())
        idx = np.flatnonzero(mask if reset else (mask & ~self.centred))
        self._pending = (reset, mask.copy(), idx)
        rows = np.asarray(self.X[idx], dtype=np.float32) if len(idx) else np.empty((0, self._C.shape[1]), np.float32)
        return reset, rows

    def sync_end(self, centres: np.ndarray) -> int:
        """Apply :meth:`sync_begin`'s outcome with the centres gathered from every shard."""
        reset, mask, idx = self._pending
        self._pending = None
        before = self.dist_evals
        if reset:
            if self._xs is None:
                self._xs = self._row_stats()
            self.ub = np.where(mask, -np.inf, np.inf)
            self.ver = np.zeros(self.m, dtype=np.int32)
            self.centred = mask.copy()
            self.n_valid = int(self.m - mask.sum())
            self.k = 0
            self._front, self._tau = None, np.inf
        else:
            self._invalidate(idx)
        self._append_centres(centres)
        self.setup_evals += self.dist_evals - before
        return self.n_valid

    def valid_count(self) -> int:
        return self.n_valid

    def take_nth_valid(self, r: int) -> Tuple[int, np.ndarray]:
        """Pool position and features of the r-th valid row (in position order)."""
        local = int(np.flatnonzero(self.ub > -np.inf)[r])
        return self.start + local, np.array(self.X[local], dtype=np.float32)

    def commit(self, row: np.ndarray, gpos: int) -> None:
        """Record a pick: invalidate it if it is one of this shard's rows, add it as a centre."""
        local = int(gpos) - self.start
        if 0 <= local < self.m:
            self._invalidate(np.array([local]))
        self._append_centres(row)

    def step(self, row: Optional[np.ndarray], gpos: int, prune: bool) -> Tuple[float, int, Optional[np.ndarray]]:
        """Commit the previous pick (if any), then return this shard's best candidate.

        Returns:
            ``(value, pool position, feature row)``; ``(-inf, -1, None)`` when no row is left.
        """
        if row is not None:
            self.commit(row, gpos)
        val, p = self.best(prune)
        if p < 0:
            return -np.inf, -1, None
        return val, self.start + p, np.array(self.X[p], dtype=np.float32)

    def stats(self) -> dict:
        return {"dist_evals": int(self.dist_evals), "setup_evals": int(self.setup_evals), "centres": int(self.k)}


def _pick_best(results: Sequence[Tuple[float, int, Any]]) -> Tuple[float, int, Any]:
    """Largest value, ties to the lower pool position."""
    best = None
    for r in results:
        if r[1] < 0:
            continue
        if best is None or r[0] > best[0] or (r[0] == best[0] and r[1] < best[1]):
            best = r
    return best


def kcenter_select(
    group, name: str, masks: Sequence[np.ndarray], n: int, rng: np.random.Generator, prune: bool, timing: Optional[dict] = None
) -> np.ndarray:
    """Greedy k-center over the shards of ``group`` (local or Ray), centres = the labelled set.

    With no labelled row at all, the first centre is drawn uniformly (``rng.integers``) among
    the unlabelled rows.

    Args:
        timing: filled with ``setup_s`` (syncing the centres with the labelled set).

    Returns:
        int64 (n,) pool positions, in pick order.
    """
    timing = {} if timing is None else timing
    t0 = time.perf_counter()
    begins = group.call_all(name, "sync_begin", [(m, False) for m in masks])
    if any(r for r, _ in begins) and not all(r for r, _ in begins):
        # The centre set is global: one shard's reset resets all.
        begins = [b if b[0] else group.call_one(i, name, "sync_begin", masks[i], True) for i, b in enumerate(begins)]
    centres = np.concatenate([rows for _, rows in begins]) if begins else np.empty((0, 0), np.float32)
    counts = group.call_all(name, "sync_end", common=(centres,))
    timing["setup_s"] = time.perf_counter() - t0
    picks: List[int] = []
    if len(centres) == 0:
        r = int(rng.integers(int(sum(counts))))
        cum = np.cumsum(counts)
        i = int(np.searchsorted(cum, r, side="right"))
        gpos, row = group.call_one(i, name, "take_nth_valid", r - (int(cum[i - 1]) if i else 0))
        picks.append(int(gpos))
        if n == 1:
            group.call_all(name, "commit", common=(row, gpos))
            return np.asarray(picks, dtype=np.int64)
        results = group.call_all(name, "step", common=(row, gpos, prune))
    else:
        results = group.call_all(name, "step", common=(None, -1, prune))
    while True:
        val, gpos, row = _pick_best(results)
        picks.append(int(gpos))
        if len(picks) == n:
            # Keep the cached state consistent for the next round: the pick is a centre.
            group.call_all(name, "commit", common=(row, gpos))
            return np.asarray(picks, dtype=np.int64)
        results = group.call_all(name, "step", common=(row, gpos, prune))


class _ShardedMixin:
    """Execution switch and shard bookkeeping shared by coreset and BADGE."""

    def _check_exec(self) -> None:
        check_execution(self.name, self.execution, self.num_shards, self.shard_min_rows, self.actor_options)

    def _actor_shards(self, features: np.ndarray, n_rows: int) -> PoolShards:
        shards = getattr(self, "_shards", None)
        if shards is None or not shards.matches(features, n_rows):
            if shards is not None:
                shards.close()
            self._shards = PoolShards(features, n_rows, self.num_shards, self.actor_options)
        return self._shards

    def close(self) -> None:
        """Release cached state and shard actors (they are rebuilt on the next select)."""
        shards = getattr(self, "_shards", None)
        if shards is not None:
            shards.close()
        self._shards = None
        self._local = None
        self._sharded_state = None

    def __getstate__(self):
        # Caches hold weak references and actor handles: a copy starts without them.
        state = dict(self.__dict__)
        state["_shards"] = None
        state["_local"] = None
        state["_sharded_state"] = None
        return state


@STRATEGIES.register("coreset")
class CoresetSampling(_ShardedMixin, Strategy):
    """k-center greedy (Sener & Savarese) on the current features, seeded from the labelled set.

    Each pick is the unlabelled row whose distance to the nearest labelled-or-picked row is
    largest (ties: the lower row). The minimum-distance state is cached on this object between
    rounds and keyed by the feature version; rows labelled in between (by this strategy or
    not) are added as centres, and a label that disappears triggers an exact rebuild.

    Args:
        metric: "euclidean" or "cosine" (1 - cosine similarity).
        prune: skip rows whose stale bound cannot win (exact; reads a fraction of the pool per
            pick); False runs one full fused pass per pick.
        execution: "local", "sharded" (Ray actors, one shard each) or "auto" (sharded when
            Ray is initialised and the pool has at least ``shard_min_rows`` rows).
        num_shards: shards when sharded; None means one per alive Ray node (at least 2).
        shard_min_rows: pool size from which "auto" shards.
        actor_options: Ray options of the shard actors (default ``{"num_cpus": 1}``).
    """

    name = "coreset"

    def __init__(
        self,
        metric: str = "euclidean",
        prune: bool = True,
        execution: str = "auto",
        num_shards: Optional[int] = None,
        shard_min_rows: int = DEFAULT_SHARD_MIN_ROWS,
        actor_options: Optional[dict] = None,
    ):
        self.metric = metric
        self.prune = prune
        self.execution = execution
        self.num_shards = num_shards
        self.shard_min_rows = shard_min_rows
        self.actor_options = actor_options
        self._local = None
        self._shards = None
        self._sharded_state = None

    def _check_params(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"coreset: metric={self.metric!r} is not one of {', '.join(METRICS)}")
        if not isinstance(self.prune, bool):
            raise ConfigError(f"coreset: prune={self.prune!r} must be True or False")
        self._check_exec()

    def _select_positions(self, pool: PoolView, n: int, rng: np.random.Generator) -> np.ndarray:
        self._check_params()
        features = _need_features("coreset", pool)
        chunk = _chunk_rows(pool)
        state_key = (self.metric, chunk)
        if resolve_execution(self.execution, len(pool), self.shard_min_rows) == "sharded":
            self._local = None
            shards = self._actor_shards(features, len(pool))
            group = shards.group
            built = self._sharded_state
            if (
                built is None
                or built["shards"] is not shards
                or built["key"] != state_key
                or not np.array_equal(built["ids"], pool.ids)
            ):
                group.build("kcenter", KCenterShard, [(self.metric, chunk)] * len(group))
                self._sharded_state = {"shards": shards, "key": state_key, "ids": pool.ids.copy()}
        else:
            if self._shards is not None:
                self._shards.close()
                self._shards = None
                self._sharded_state = None
            cached = self._local
            if (
                cached is None
                or cached["key"] != state_key
                or not cached["features"].matches(features)
                or not np.array_equal(cached["ids"], pool.ids)
            ):
                group = LocalGroup([ShardHolder(features, 0)])
                group.build("kcenter", KCenterShard, [(self.metric, chunk)])
                self._local = cached = {
                    "key": state_key,
                    "features": FeatureKey(features),
                    "ids": pool.ids.copy(),
                    "group": group,
                }
            group = cached["group"]
        masks = [pool.labeled_mask[s:e] for s, e in group.bounds]
        self.last_timing_ = {}
        t0 = time.perf_counter()
        picks = kcenter_select(group, "kcenter", masks, n, rng, self.prune, self.last_timing_)
        self.last_timing_["total_s"] = time.perf_counter() - t0
        return picks

    def stats(self) -> List[dict]:
        """Per-shard counters of the cached state (distance evaluations, centres)."""
        if self._local is not None:
            return self._local["group"].call_all("kcenter", "stats")
        if self._shards is not None:
            return self._shards.group.call_all("kcenter", "stats")
        return []

    def __repr__(self) -> str:
        return f"CoresetSampling(metric={self.metric!r}, prune={self.prune!r}, execution={self.execution!r})"


# ============================================================================ BADGE
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
    a = _row_sqnorms(e) * _row_sqnorms(h)
    a_c = float(_row_sqnorms(np.asarray(e_c)[None])[0] * _row_sqnorms(np.asarray(h_c)[None])[0])
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
        hn = np.sqrt(_row_sqnorms(H))
        if not np.isfinite(hn).all():
            bad = self.start + int(self.rows[_first_bad_row(hn)])
            raise BadInputError(
                f"badge: non-finite hidden activations (or features) at pool row {bad}; clean or re-extract those features"
            )
        self.a = _row_sqnorms(E) * hn**2  # ||g||^2
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
        hc = np.float32(np.sqrt(_row_sqnorms(h[None])[0]))
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
class BadgeSampling(_ShardedMixin, Strategy):
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

    def __init__(
        self,
        first: str = "random",
        execution: str = "auto",
        num_shards: Optional[int] = None,
        shard_min_rows: int = DEFAULT_SHARD_MIN_ROWS,
        actor_options: Optional[dict] = None,
    ):
        self.first = first
        self.execution = execution
        self.num_shards = num_shards
        self.shard_min_rows = shard_min_rows
        self.actor_options = actor_options
        self._local = None
        self._shards = None
        self.last_stats_: List[dict] = []
        self.last_timing_: dict = {}

    def _select_positions(self, pool: PoolView, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.first not in FIRST_CENTRE:
            raise ConfigError(f"badge: first={self.first!r} is not one of {', '.join(FIRST_CENTRE)}")
        self._check_exec()
        features = _need_features("badge", pool)
        if pool.probs is None and pool.model is None:
            raise BadInputError(
                "badge needs class probabilities: give PoolView.probs, or a fitted PoolView.model "
                "(hidden activations come from the model, else the features are used)"
            )
        chunk = _chunk_rows(pool)
        if resolve_execution(self.execution, len(pool), self.shard_min_rows) == "sharded":
            group = self._actor_shards(features, len(pool)).group
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
