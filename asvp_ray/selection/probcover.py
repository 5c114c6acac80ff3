"""ProbCover (Yehuda et al., NeurIPS 2022) on features.

The delta-ball graph (``x -> y`` when
``||x - y|| < delta``, self-loops included) is covered greedily: each pick is the point that
covers the most not-yet-covered points (ties: the lower row); the labelled set's balls are
covered from the start. When everything is covered, the remaining picks are uniform among the
unlabelled points. The graph is exact (blocked brute force) for small pools and built with an
IVF index (k-means cells, each point searched in its ``nprobe`` nearest cells, BLAS-blocked
scans, made symmetric) for large ones; it is stored sparse and cached on the strategy object
for the feature version.

"""
from __future__ import annotations

from typing import List, Optional

import numpy as np

from asvp_ray.core.checks import check_int, is_number
from asvp_ray.runtime.device import require_faiss_gpu
from asvp_ray.core.errors import ConfigError
from asvp_ray.pool.identity import FeatureKey
from asvp_ray.pool.view import PoolView
from asvp_ray.selection._common import need_features
from asvp_ray.selection._graph import GRAPH_METHODS, DeltaGraph, delta_graph, graph_recall  # noqa: F401
from asvp_ray.selection.base import STRATEGIES, Strategy


def probcover_select(graph: DeltaGraph, mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy max coverage on ``graph`` (exact, incremental degrees).

    Returns:
        int64 (n,) row positions in pick order.
    """
    N = graph.n_rows
    covered = np.zeros(N, dtype=bool)
    covered[graph.neighbours(np.flatnonzero(mask))] = True
    # Self-loops make every row non-empty, so reduceat sees no empty segment.
    deg = np.add.reduceat((~covered[graph.indices]).astype(np.int64), graph.indptr[:-1])
    picks: List[int] = []
    while len(picks) < n:
        c = int(np.argmax(deg))
        if deg[c] <= 0:
            break
        picks.append(c)
        nb = graph.indices[graph.indptr[c] : graph.indptr[c + 1]]
        new = nb[~covered[nb]]
        covered[new] = True
        # The graph is symmetric: the rows pointing at a newly covered y are y's neighbours.
        np.subtract.at(deg, graph.neighbours(new), 1)
    if len(picks) < n:
        taken = mask.copy()
        taken[picks] = True
        rest = np.flatnonzero(~taken)
        picks.extend(rest[rng.choice(len(rest), size=n - len(picks), replace=False)].tolist())
    return np.asarray(picks, dtype=np.int64)


@STRATEGIES.register("probcover")
class ProbCoverSampling(Strategy):
    """ProbCover: greedy coverage of the delta-ball graph of the features.

    Args:
        delta: ball radius (0.75 is the paper's CIFAR-10 value on unit-length embeddings).
        normalize: L2-normalise features first.
        graph: "exact", "ivf" or "auto" (exact up to ``exact_max_rows`` rows).
        exact_max_rows: pool size up to which "auto" builds the exact graph.
        nlist: IVF cells (None: ``clip(sqrt(N), 16, 4096)``).
        nprobe: IVF cells searched per row.
        graph_seed: seed of the IVF k-means (the graph is a function of the features).
        use_gpu: IVF k-means on the GPU (faiss GPU build).
    """

    name = "probcover"

    def __init__(
        self,
        delta: float = 0.75,
        normalize: bool = True,
        graph: str = "auto",
        exact_max_rows: int = 50_000,
        nlist: Optional[int] = None,
        nprobe: int = 8,
        graph_seed: int = 0,
        use_gpu: bool = False,
    ):
        self.delta = delta
        self.normalize = normalize
        self.graph = graph
        self.exact_max_rows = exact_max_rows
        self.nlist = nlist
        self.nprobe = nprobe
        self.graph_seed = graph_seed
        self.use_gpu = use_gpu
        self._cache = None

    def _check_params(self) -> None:
        if not is_number(self.delta) or self.delta <= 0:
            raise ConfigError(f"probcover: delta={self.delta!r} must be a positive number")
        if self.graph not in GRAPH_METHODS:
            raise ConfigError(f"probcover: graph={self.graph!r} is not one of {', '.join(GRAPH_METHODS)}")
        check_int("probcover", "exact_max_rows", self.exact_max_rows)
        check_int("probcover", "nlist", self.nlist, allow_none=True)
        check_int("probcover", "nprobe", self.nprobe)
        if self.use_gpu:
            require_faiss_gpu("probcover")

    def build_graph(self, features: np.ndarray) -> DeltaGraph:
        """The delta-ball graph of ``features`` with this strategy's settings (cached)."""
        self._check_params()
        method = self.graph
        if method == "auto":
            method = "exact" if len(features) <= self.exact_max_rows else "ivf"
        params = (float(self.delta), bool(self.normalize), method, self.nlist, int(self.nprobe), int(self.graph_seed))
        cache = self._cache
        if cache is not None and cache["params"] == params and cache["features"].matches(features):
            return cache["graph"]
        self._cache = None
        g = delta_graph(features, self.delta, method, bool(self.normalize), self.nlist, int(self.nprobe),
                        int(self.graph_seed), bool(self.use_gpu))
        self._cache = {"params": params, "features": FeatureKey(features), "graph": g}
        return g

    def _select_positions(self, pool: PoolView, n: int, rng: np.random.Generator) -> np.ndarray:
        graph = self.build_graph(need_features("probcover", pool))
        return probcover_select(graph, pool.labeled_mask, n, rng)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def __repr__(self) -> str:
        return f"ProbCoverSampling(delta={self.delta!r}, normalize={self.normalize!r}, graph={self.graph!r})"
