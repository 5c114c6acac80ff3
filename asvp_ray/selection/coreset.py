"""k-center greedy coreset on features (Sener & Savarese, 2018).

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

It runs on one in-process shard or on shards held by Ray actors
(:mod:`asvp_ray.selection.sharded`), with the same code and the same picks.
"""
from __future__ import annotations

import time
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from asvp_ray.core.errors import BadInputError, ConfigError
from asvp_ray.pool.identity import FeatureKey
from asvp_ray.pool.shards import LocalGroup, ShardHolder
from asvp_ray.pool.view import PoolView
from asvp_ray.selection._common import chunk_rows, first_bad_row, need_features, row_sqnorms
from asvp_ray.selection.base import STRATEGIES, Strategy
from asvp_ray.selection.sharded import DEFAULT_SHARD_MIN_ROWS, ShardedExecution

METRICS = ("euclidean", "cosine")
# Elements of one (rows x centres) block of a refresh: 4 Mi -> 16 MiB float32 + 32 MiB float64.
BLOCK_ELEMENTS = 1 << 22


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
        sq = row_sqnorms(x)
        if not np.isfinite(sq).all():
            bad = first_row + first_bad_row(sq)
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


@STRATEGIES.register("coreset")
class CoresetSampling(ShardedExecution, Strategy):
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
    _CACHE_ATTRS = ("_shards", "_local", "_sharded_state")

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
        self._init_execution(execution, num_shards, shard_min_rows, actor_options)
        self._local = None
        self._sharded_state = None

    def _check_params(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"coreset: metric={self.metric!r} is not one of {', '.join(METRICS)}")
        if not isinstance(self.prune, bool):
            raise ConfigError(f"coreset: prune={self.prune!r} must be True or False")
        self._check_exec()

    def _select_positions(self, pool: PoolView, n: int, rng: np.random.Generator) -> np.ndarray:
        self._check_params()
        features = need_features("coreset", pool, sharded_ok=True)
        chunk = chunk_rows(pool)
        state_key = (self.metric, chunk)
        if self._pool_resolve(pool) == "sharded":
            self._local = None
            shards = self._pool_shards(pool, features)
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
