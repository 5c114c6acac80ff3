"""The run's feature versions: v0 (from the shared feature cache, else extracted), the versions
refreshes write (v1, v2, ...), the current one loaded as memory maps, and the clean-up of
half-written, uncommitted and old versions.

Which version is current is part of the run's committed state (``state.json``'s
``feature_version``); this module only acts on what the driver tells it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from asvp_ray.features.extract import extract_to_store

log = logging.getLogger("asvp_ray.driver")


def _device_seconds(wall: float, resources: Dict[str, float]) -> Dict[str, float]:
    return {"wall_s": round(wall, 4), "cpu_s": round(wall * resources.get("cpus", 1.0), 4),
            "gpu_s": round(wall * resources.get("gpus", 0.0), 4)}


def auto_pool_mode(rows: int, dim: int, node_memory: float, fraction: float, other_nodes: bool):
    """``pool_shards.mode: auto``: where the pool matrix (``rows`` x ``dim`` float32) lives.

    It stays in the driver while it takes at most ``fraction`` of the driver node's memory
    (``node_memory`` bytes), and when it takes more but there is no other node to hold shards
    (none up now, and no autoscaler that can add one): shard actors on the driver's own node
    would hold the same bytes there. Otherwise it goes to shard actors.

    Returns:
        ("driver" | "shards", the decision in words with its numbers, for the log).
    """
    matrix = rows * dim * 4
    share = matrix / node_memory if node_memory > 0 else float("inf")
    line = (f"pool {rows:,} x {dim} = {matrix / 1e9:.2f} GB = {100 * share:.1f}% of the driver node's "
            f"{node_memory / 1e9:.1f} GB (at most {100 * fraction:g}% in the driver: "
            f"pool_shards.driver_memory_fraction)")
    if share <= fraction or not other_nodes:
        return "driver", line + "; kept in the driver"
    return "shards", line


class FeatureVersions:
    """Feature versions of one run directory.

    Args:
        rd: the :class:`~asvp_ray.loop.rundir.RunDir`.
        cfg: the run's config.
        pool, test: the pool and test sources (test may be None).
        spec: the backbone spec.
        on_progress: called with the progress dict of a running extraction.

    Attributes (after :meth:`open`): ``current`` (the version in use), ``ids`` (sorted pool ids),
    ``features`` (their rows), ``test_ids``, ``test_features``, ``test_labels`` (with a test set).
    """

    def __init__(self, rd, cfg, pool, test, spec, on_progress: Callable[[Dict[str, Any]], None]):
        self.rd, self.cfg, self.pool, self.test, self.spec = rd, cfg, pool, test, spec
        self.store = rd.open_store(cfg.storage)  # DIR/features, or this run's folder on the storage
        self.on_progress = on_progress
        self.current: Optional[int] = None
        self.features: Optional[np.ndarray] = None
        self._shards = None

    # ------------------------------------------------------------------ resume
    def open(self, committed: Optional[int]) -> Optional[float]:
        """Make the committed version current: remove half-written versions, create v0 when the
        run has none yet, remove versions of refreshes that never committed, load it.

        Returns:
            what to charge for v0 when this call made it (see :meth:`_extract_v0_or_reuse`), for
            :meth:`charge_v0`; None when v0 was already there.
        """
        gone = self.store.clean_partial()
        if gone:
            log.warning("removed half-written feature versions left by a crash: %s", gone)
        pending = None
        if committed is None:
            committed = 0
            if 0 not in self.store.versions():
                pending = self._extract_v0_or_reuse()
        self.current = int(committed)
        for v in self.store.versions():
            if v > self.current:  # written by a refresh that never committed
                log.warning("removing feature version v%d: its refresh was not committed", v)
                self.store.remove(v)
        self.load()
        return pending

    def load(self) -> None:
        """Read the current version's pool ids and test features, and the pool's features unless
        ``pool_shards`` keeps them in shard actors (then :attr:`shards` loads them on first use)."""
        store = self.store
        self.release_shards()
        self.features = None
        self.ids = self._shared_ids(store.read_ids(self.current))
        self.pool_mode = self._pool_mode()
        if self.pool_mode == "driver":
            ids, self.features = store.read(self.current)
            self.ids = self._shared_ids(ids)
        else:
            log.info("feature version v%d: %d pool rows stay in shard actors that load them from %s; the driver "
                     "holds their ids only (pool_shards.mode=%s)", self.current, len(self.ids),
                     store.path(self.current), self.cfg.pool_shards.mode)
        if self.test is not None:
            self.test_ids, self.test_features = store.read(self.current, "test")
            self.test_labels = self.test.label_of(self.test_ids)
        meta = store.meta(self.current)
        self.skipped = {s["id"] for s in meta.get("skipped", []) if s.get("split", "pool") == "pool"}

    def _shared_ids(self, ids: np.ndarray) -> np.ndarray:
        """The pool source's own id array when the version holds exactly its ids (no image was
        skipped): one copy of 8 bytes a row in the driver, not two."""
        src = self.pool.ids
        return src if len(src) == len(ids) and np.array_equal(src, ids) else ids

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Feature rows of pool ids (``self.ids`` is sorted)."""
        return np.searchsorted(self.ids, ids)

    def _pool_mode(self) -> str:
        """``pool_shards.mode``, with ``auto`` decided by :func:`auto_pool_mode` (logged)."""
        ps = self.cfg.pool_shards
        if ps.mode != "auto":
            return ps.mode
        rows = len(self.ids)
        if ps.min_rows is not None:  # deprecated: by rows, whatever their width, as before
            mode = "shards" if rows >= ps.min_rows else "driver"
            log.info("pool_shards.mode auto with min_rows %d (deprecated; driver_memory_fraction decides by bytes "
                     "when min_rows is unset): %d pool rows; %s", ps.min_rows, rows,
                     "sharded" if mode == "shards" else "kept in the driver")
            return mode
        meta = self.store.meta(self.current)
        dim = int((meta.get("splits", {}).get("pool") or {}).get("dim") or meta.get("dim") or 0)
        from asvp_ray.runtime.ray_utils import init_ray
        from asvp_ray.runtime.resources import cluster_capacity, this_node

        node = this_node()
        matrix = rows * dim * 4
        if matrix > ps.driver_memory_fraction * node["memory"] and not node["resources"]:
            init_ray()  # over the limit by this machine's memory: ask Ray for the node's and the cluster's
            node = this_node()
        others, cluster = False, ""
        if matrix > ps.driver_memory_fraction * node["memory"]:
            now = node["resources"]
            cap, autoscaling = cluster_capacity()
            others = node["alive_nodes"] > 1 or any(cap.get(r, 0.0) > now.get(r, 0.0) for r in ("memory", "CPU"))
            cluster = (f"{node['alive_nodes']} node{'s' if node['alive_nodes'] != 1 else ''} up; the cluster "
                       f"{'can grow to' if autoscaling else 'has'} {cap.get('CPU', 0.0):g} CPU and "
                       f"{cap.get('memory', 0.0) / 1e9:.1f} GB of memory{'' if autoscaling else ' (no autoscaler)'}")
        mode, line = auto_pool_mode(rows, dim, node["memory"], ps.driver_memory_fraction, others)
        if mode == "shards":
            from asvp_ray.pool.shards import default_num_shards

            n = ps.num_shards or default_num_shards()
            log.info("pool_shards auto: %s (%s); sharded over %d shard actors (%s)", line, node["source"], n, cluster)
        elif matrix <= ps.driver_memory_fraction * node["memory"]:
            log.info("pool_shards auto: %s (%s)", line, node["source"])
        else:
            log.warning("pool_shards auto: %s (%s), over the share, but no other node can hold shards (%s); "
                        "pool_shards.mode: shards would put them on this same node", line, node["source"], cluster)
        return mode

    @property
    def shards(self):
        """The shard actors holding the current version's pool rows (None when the driver holds
        them); started on first use, loading their rows from the store."""
        if self.features is not None or self.current is None:
            return None
        if self._shards is None:
            from asvp_ray.runtime.ray_utils import init_ray
            from asvp_ray.pool.store_shards import StoreShards

            init_ray()
            ps = self.cfg.pool_shards
            t0 = time.perf_counter()
            self._shards = StoreShards(self.store.part_files(self.current), self.ids, ps.num_shards,
                                       {"num_cpus": ps.num_cpus}, key=("store", str(self.store.path(self.current))))
            log.info("%d shard actors loaded features v%d (%d rows) in %.1fs", self._shards.num_shards, self.current,
                     len(self.ids), time.perf_counter() - t0)
        return self._shards

    def release_shards(self) -> None:
        """Stop the shard actors (before work that needs their CPUs: fine-tuning, extraction; or a
        version switch, so no process ever holds two versions)."""
        if self._shards is not None:
            self._shards.close()
            self._shards = None

    def features_at(self, positions: np.ndarray) -> np.ndarray:
        """Pool features at row positions, from the driver's matrix or the shards."""
        if self.features is not None:
            return self.features[positions]
        return self.shards.rows_at(positions)

    def features_of(self, ids: np.ndarray) -> np.ndarray:
        """Pool features of ``ids`` (the labelled rows, for the proxy and the monitor)."""
        return self.features_at(self.rows(ids))

    def describe(self) -> List[Dict[str, Any]]:
        """One record per stored version, for the summary."""
        out = []
        for v in self.store.versions():
            m = self.store.meta(v)
            out.append({"version": v, "rows": m["rows"], "dim": m["dim"], "weights": m["weights"],
                        "seconds": m.get("seconds"), "cost": m.get("cost"), "path": str(self.store.path(v))})
        return out

    # ------------------------------------------------------------------ writing versions
    def _cache_inputs(self) -> Dict[str, Any]:
        from asvp_ray.features.backbones import backbone_weights_hash

        return {"backbone": asdict(self.spec), "weights_hash": backbone_weights_hash(self.spec),
                "pool": self.pool.describe(), "test": self.test.describe() if self.test is not None else None,
                "skip_unreadable": self.cfg.data.skip_unreadable}

    # ---- what feature versions cost (issue 18): meta.json → cost, charged to the ledger
    def _extract_v0_or_reuse(self) -> Dict[str, Any]:
        """Features v0: from the shared feature cache when it has them, else extracted (and cached).

        Returns:
            what to charge: ``{"cached": False, "wall_s", "resources"}`` for an extraction run
            here, ``{"cached": True, "cost", "spent_s", "source"}`` for a cached version.
        """
        from asvp_ray.features.extract_plan import resolve_compute
        from asvp_ray.storage.locations import is_uri, join_uri
        from asvp_ray.features.cache import cache_key, check_cached_compute, legacy_cache_entries, link_version
        from asvp_ray.features.store import FeatureStore
        from asvp_ray.core.redact import redact_uri

        t0 = time.perf_counter()
        if getattr(self.pool, "kind", "") == "embeddings":  # bring your own: v0 is the file itself
            self.import_embeddings()
            return {"cached": False, "wall_s": time.perf_counter() - t0, "resources": {"cpus": 1.0, "gpus": 0.0}}
        if not self.cfg.feature_cache:
            self.extract(0)
            return {"cached": False, "wall_s": time.perf_counter() - t0, "resources": self.extract_resources()}
        # Device and precision name the entry: bf16 GPU features are never served to a CPU run.
        compute = resolve_compute(self.cfg.extract)
        key = cache_key(self._cache_inputs(), device=compute.device, precision=compute.precision)
        in_bucket = is_uri(self.cfg.feature_cache)
        cache = FeatureStore(join_uri(self.cfg.feature_cache, key) if in_bucket else Path(self.cfg.feature_cache) / key)
        shown = redact_uri(str(cache.root)) if in_bucket else str(cache.root)
        if 0 not in cache.versions():
            old = [] if in_bucket else legacy_cache_entries(Path(self.cfg.feature_cache))
            if old:
                log.warning("feature cache %s holds %d entr%s made before device and precision were part of the "
                            "key (%s); they are not reused (delete them to free the space)", self.cfg.feature_cache,
                            len(old), "y" if len(old) == 1 else "ies", ", ".join(p.name for p in old))
            log.info("feature cache %s has no features for this backbone, data, device (%s) and precision (%s); "
                     "extracting", shown, compute.device, compute.precision)
            self.extract(0, compute=compute)
            res = self.extract_resources()
            wall = time.perf_counter() - t0
            cost = dict(self.store.meta(0).get("cost") or {}, phase="extract", resources=res,
                        **_device_seconds(wall, res), charged_by=self.rd.location)
            try:  # the cache's copy records what this run is charged, so runs reusing it pay the same
                link_version(self.store.path(0), cache, 0, meta_update={"cost": cost})
            except OSError as e:  # another run cached it first: theirs is identical
                log.info("feature cache not updated (%s)", e)
            return {"cached": False, "wall_s": wall, "resources": res}
        entry = redact_uri(str(cache.path(0)))
        check_cached_compute(cache.meta(0), compute.device, compute.precision, entry)
        log.info("reusing features v0 from the feature cache %s (%s, %s)", entry, compute.device, compute.precision)
        link_version(cache.path(0), self.store, 0)
        cost = self.store.meta(0).get("cost")
        return {"cached": True, "cost": cost, "spent_s": time.perf_counter() - t0, "source": entry}

    def charge_v0(self, ledger, pending: Optional[Dict[str, Any]]) -> None:
        """Charge features v0 to the ledger: what this process spent extracting them, or, for a
        version made elsewhere (the feature cache, or an earlier process on this run directory
        that stopped before committing its charge), what meta.json says it cost.

        Args:
            ledger: the run's :class:`~asvp_ray.loop.ledger.CostLedger`.
            pending: what :meth:`open` returned.
        """
        if pending is not None and not pending["cached"]:
            ledger.add("extract", pending["wall_s"], **pending["resources"])
            return
        if pending is not None:
            if not pending["cost"]:
                log.warning("features v0 from %s record no cost (made before costs were recorded); this run is "
                            "charged 0 s for them", pending["source"])
            ledger.add_version("extract", pending["cost"], pending["spent_s"], version=0, source=pending["source"])
            return
        if not ledger.has("extract") and 0 in self.store.versions():
            ledger.add_version("extract", self.store.meta(0).get("cost"), 0.0, version=0,
                               source=str(self.store.path(0)))

    def extract(self, version: int, checkpoint: Optional[str] = None, phase: str = "extract",
                finetune_cost: Optional[Dict[str, Any]] = None, compute=None) -> None:
        """Extract pool and test features into ``version`` (``checkpoint``: a fine-tuned model file).

        Args:
            phase: the ledger phase it is charged under, recorded in meta.json → ``cost``.
            finetune_cost: for a refreshed version, the fine-tune that made its weights.
            compute: the device and precision (default: ``resolve_compute``).
        """
        self.release_shards()  # their CPUs go to the extraction actors
        self.on_progress({"phase": f"extract v{version}", "total": len(self.pool) + (len(self.test or []))})
        log.info("extracting feature version v%d (%d pool + %d test images, %s)", version, len(self.pool),
                 len(self.test) if self.test is not None else 0, self.spec.name)
        cost: Dict[str, Any] = {"phase": phase, "resources": self.extract_resources()}
        if finetune_cost:
            cost["finetune"] = finetune_cost
        meta = extract_to_store(self.store, version, self.pool, self.spec, self.cfg.extract, test=self.test,
                                checkpoint=checkpoint, skip_unreadable=self.cfg.data.skip_unreadable,
                                extra_meta={"run": self.rd.location, "cost": cost}, compute=compute)
        log.info("feature version v%d: %d x %d in %.1fs", version, meta["rows"], meta["dim"], meta["seconds"])

    def import_embeddings(self) -> None:
        """Write feature version v0 from an embeddings pool (and test set): Ray Data tasks read the
        Parquet files and write the version's parts; the driver gets their records and commits."""
        from asvp_ray.features.embeddings import write_embedding_parts
        from asvp_ray.features.extract import _Progress
        from asvp_ray.features.parts import POOL, rows_per_part
        from asvp_ray.runtime.ray_utils import init_ray

        init_ray()
        total = len(self.pool) + len(self.test or [])
        self.on_progress({"phase": "import embeddings v0", "total": total})
        log.info("features v0 from the embeddings %s (%d pool rows%s)", self.pool.path, len(self.pool),
                 f", {len(self.test)} test rows from {self.test.path}" if self.test is not None else "")
        t0 = time.perf_counter()
        meta = {"backbone": None, "weights": "embeddings", "pool_source": self.pool.describe(),
                "test_source": self.test.describe() if self.test is not None else None, "run": self.rd.location,
                "cost": {"phase": "extract", "resources": {"cpus": 1.0, "gpus": 0.0}}, "skipped": []}
        bar = _Progress(total, "features v0 (embeddings)", self.cfg.extract.progress)
        try:
            with self.store.writer(0, meta) as w:
                for split, src in ((POOL, self.pool), ("test", self.test)):
                    if src is None:
                        continue
                    part_rows = rows_per_part(src.dim or 1024)
                    for rec in write_embedding_parts(src, str(w.folder(split)), part_rows, on_rows=bar):
                        w.add_part(rec, split)
                    if w.splits[split].rows != len(src):  # a lost or doubled part: never commit it
                        from asvp_ray.core.errors import AsvpError

                        raise AsvpError(f"importing the embeddings {src.path}: the workers wrote "
                                        f"{w.splits[split].rows} of {len(src)} rows; nothing was committed, rerun")
                if self.test is not None and w.splits["test"].dim != w.splits[POOL].dim:
                    from asvp_ray.core.errors import BadInputError

                    raise BadInputError(f"the test embeddings {self.test.path} have {w.splits['test'].dim} values per "
                                        f"row but the pool's {self.pool.path} have {w.splits[POOL].dim}; both must "
                                        "come from the same model")
                w.meta["seconds"] = round(time.perf_counter() - t0, 3)
                w.commit()
        finally:
            bar.close()
        m = self.store.meta(0)
        log.info("feature version v0: %d x %d from embeddings in %.1fs", m["rows"], m["dim"], m["seconds"])

    def extract_resources(self) -> Dict[str, float]:
        """CPUs and GPUs an extraction holds (for the cost ledger)."""
        from asvp_ray.features.extract_plan import plan_actors

        plan = plan_actors(self.cfg.extract)
        return {"cpus": plan.num_actors * plan.num_cpus + 1.0, "gpus": plan.num_actors * plan.num_gpus}

    def switch_to(self, version: int) -> None:
        """Make ``version`` current and load it (committed by the driver's next commit)."""
        self.current = int(version)
        self.load()

    def prune(self) -> None:
        """Keep v0, the current version and the newest ``refresh.keep_versions`` (0 = keep all);
        call only after the state that stops referencing the others is committed."""
        keep = self.cfg.refresh.keep_versions
        if keep <= 0:
            return
        versions = [v for v in self.store.versions() if v not in (0, self.current)]
        for v in versions[:-keep] if len(versions) > keep else []:
            log.info("removing feature version v%d (refresh.keep_versions=%d)", v, keep)
            self.store.remove(v)
