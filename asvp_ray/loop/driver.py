"""The driver: owns one run's state and runs its rounds. ``DriverActor`` is it as a Ray actor.

State it owns: the labelled set (id, label, round labelled), the current feature version, the
proxy, the strategy, and the per-round random generators (``default_rng([seed, round])``, so a
resumed run draws exactly what an uninterrupted one would). The CLI only talks to it.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from asvp_ray.config import Config, dump_config, load_config
from asvp_ray.data.sources import build_source
from asvp_ray.errors import ConfigError, RunDirError
from asvp_ray.features.backbones import BackboneSpec
from asvp_ray.features.extract import extract_to_store
from asvp_ray.loop.oracle import ORACLES
from asvp_ray.loop.rundir import RunDir
from asvp_ray.proxy.mlp import MLPProxy
from asvp_ray.ray_utils import quiet_ray_data
from asvp_ray.selection import STRATEGIES, PoolView

log = logging.getLogger("asvp_ray.driver")

# Config sections that may change between a run and its resume (they do not change results).
RESUMABLE_CHANGES = ("extract",)


def config_differences(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        key = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, key + ".")
        elif a != b:
            out.append(key)
    return out


class Driver:
    """Runs the rounds of one active-learning experiment in a run directory.

    Args:
        config: the validated config (or its dict form, as sent to a Ray actor).
        out: the run directory.
    """

    def __init__(self, config, out: str):
        self.cfg: Config = config if isinstance(config, Config) else load_config(raw=config)
        self.rd = RunDir(out).lock()
        self._log_handler = logging.FileHandler(self.rd.log_path)
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("asvp_ray").addHandler(self._log_handler)
        logging.getLogger("asvp_ray").setLevel(logging.INFO)
        self._progress: Dict[str, Any] = {"phase": "starting"}
        quiet_ray_data()
        self._check_config_matches()
        self.pool = build_source(self.cfg.data.pool, self.cfg.data.classes)
        self.test = build_source(self.cfg.data.test, self.cfg.data.classes) if self.cfg.data.test else None
        classes = self.cfg.data.classes or self.pool.classes
        if not classes:
            raise ConfigError("the pool has no class names; list them in data.classes")
        self.classes: List[str] = list(classes)
        schedule = self.cfg.budget.schedule
        if sum(schedule) > len(self.pool):
            raise ConfigError(f"budget.schedule {schedule} buys {sum(schedule)} labels but the pool holds "
                              f"{len(self.pool)} images; shorten the schedule or use a larger pool")
        self.strategy = STRATEGIES.create(self.cfg.strategy)
        self.cold_start = STRATEGIES.create("random")
        self.oracle = ORACLES.create("simulated", source=self.pool)
        self.spec = BackboneSpec(**self.cfg.backbone.model_dump())
        self.proxy: Optional[MLPProxy] = None
        self.feature_version: Optional[int] = None
        self.summary: Dict[str, Any] = {}
        self.labeled = {k: np.zeros(0, dtype=np.int64) for k in ("id", "label", "round")}
        self.next_round = 0

    # ------------------------------------------------------------------ set-up and resume
    def _check_config_matches(self) -> None:
        new_text = dump_config(self.cfg)
        if self.rd.config_path.is_file():
            import yaml

            old = yaml.safe_load(self.rd.config_path.read_text()) or {}
            diff = [k for k in config_differences(old, self.cfg.model_dump(mode="json"))
                    if not k.startswith(RESUMABLE_CHANGES)]
            if diff:
                raise RunDirError(f"{self.rd.path} holds a run made with a different config (differs in: "
                                  f"{', '.join(diff)}); resume it with the same config, or use a new --out")
        self.rd.write_config(new_text)

    def prepare(self) -> Dict[str, Any]:
        """Extract features v0 if needed, load state, roll back uncommitted rows, rebuild the proxy."""
        store = self.rd.store
        gone = store.clean_partial()
        if gone:
            log.warning("removed half-written feature versions left by a crash: %s", gone)
        state = self.rd.read_state()
        if state is None:
            self.next_round, self.feature_version = 0, None
        else:
            self.next_round, self.feature_version = int(state["next_round"]), int(state["feature_version"])
        if self.feature_version is None:
            self.feature_version = 0
            if 0 not in store.versions():
                self._extract_v0_or_reuse()
        self._load_features()
        lab = self.rd.read_labeled()
        keep = lab["round"] < self.next_round
        if not keep.all():
            log.warning("rolling back %d label(s) of round(s) %s that were not committed", int((~keep).sum()),
                        sorted(set(lab["round"][~keep].tolist())))
        self.labeled = {k: v[keep] for k, v in lab.items()}
        self.summary = self.rd.read_summary() or self._new_summary()
        self.summary["rounds"] = [r for r in self.summary.get("rounds", []) if r["round"] < self.next_round]
        if self.next_round > 0:
            self._train_proxy(self.next_round - 1)
        self.summary["status"] = "finished" if self.finished else "running"
        self._commit()
        return self.status()

    def _new_summary(self) -> Dict[str, Any]:
        return {
            "name": self.cfg.name, "method": self.cfg.method, "strategy": self.cfg.strategy, "seed": self.cfg.seed,
            "pool_size": len(self.pool), "test_size": len(self.test) if self.test is not None else 0,
            "num_classes": len(self.classes), "classes": self.classes, "schedule": list(self.cfg.budget.schedule),
            "backbone": self.cfg.backbone.name, "feature_versions": self._feature_versions(),
            "status": "running", "rounds": [],
        }

    def _feature_versions(self) -> List[Dict[str, Any]]:
        store = self.rd.store
        out = []
        for v in store.versions():
            m = store.meta(v)
            out.append({"version": v, "rows": m["rows"], "dim": m["dim"], "weights": m["weights"],
                        "seconds": m.get("seconds"), "path": str(store.path(v))})
        return out

    def _cache_inputs(self) -> Dict[str, Any]:
        from asvp_ray.features.backbones import create_backbone, weights_hash

        return {"backbone": asdict(self.spec), "weights_hash": weights_hash(create_backbone(self.spec)),
                "pool": self.pool.describe(), "test": self.test.describe() if self.test is not None else None,
                "skip_unreadable": self.cfg.data.skip_unreadable}

    def _extract_v0_or_reuse(self) -> None:
        """Features v0: from the shared feature cache when it has them, else extracted (and cached)."""
        from asvp_ray.features.store import FeatureStore, cache_key, link_version

        if not self.cfg.feature_cache:
            return self._extract(0)
        key = cache_key(self._cache_inputs())
        cache = FeatureStore(Path(self.cfg.feature_cache) / key)
        if 0 not in cache.versions():
            log.info("feature cache %s has no features for this backbone and data; extracting", cache.root)
            self._extract(0)
            try:
                link_version(self.rd.store.path(0), cache, 0)
            except OSError as e:  # another run cached it first: theirs is identical
                log.info("feature cache not updated (%s)", e)
        else:
            log.info("reusing features v0 from the feature cache %s", cache.path(0))
            link_version(cache.path(0), self.rd.store, 0)

    def _extract(self, version: int, checkpoint: Optional[str] = None) -> None:
        self._progress = {"phase": f"extract v{version}", "total": len(self.pool) + (len(self.test or []))}
        log.info("extracting feature version v%d (%d pool + %d test images, %s)", version, len(self.pool),
                 len(self.test) if self.test is not None else 0, self.spec.name)
        meta = extract_to_store(self.rd.store, version, self.pool, self.spec, self.cfg.extract, test=self.test,
                                checkpoint=checkpoint, skip_unreadable=self.cfg.data.skip_unreadable,
                                extra_meta={"run": str(self.rd.path)})
        log.info("feature version v%d: %d x %d in %.1fs", version, meta["rows"], meta["dim"], meta["seconds"])

    def _load_features(self) -> None:
        store = self.rd.store
        self.ids, self.features = store.read(self.feature_version)
        if self.test is not None:
            self.test_ids, self.test_features = store.read(self.feature_version, "test")
            self.test_labels = self.test.label_of(self.test_ids)
        meta = store.meta(self.feature_version)
        self.skipped = {s["id"] for s in meta.get("skipped", []) if s.get("split", "pool") == "pool"}

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """Feature rows of pool ids (``self.ids`` is sorted)."""
        return np.searchsorted(self.ids, ids)

    # ------------------------------------------------------------------ the rounds
    @property
    def finished(self) -> bool:
        return self.next_round >= len(self.cfg.budget.schedule)

    def _proxy_for_round(self, r: int) -> MLPProxy:
        p = self.cfg.proxy
        return MLPProxy(hidden=p.hidden, linear=p.linear, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
                        momentum=p.momentum, weight_decay=p.weight_decay, normalize=p.normalize, device=p.device,
                        seed=int(np.random.default_rng([self.cfg.seed, r, 1]).integers(2**31)))

    def _train_proxy(self, r: int) -> float:
        X = self.features[self._rows(self.labeled["id"])]
        self.proxy = self._proxy_for_round(r).fit(X, self.labeled["label"], num_classes=len(self.classes))
        return self.proxy.score(X, self.labeled["label"])

    def pool_view(self) -> PoolView:
        mask = np.isin(self.ids, self.labeled["id"], assume_unique=True)
        return PoolView(ids=self.ids, features=self.features, labeled_mask=mask, model=self.proxy)

    @contextmanager
    def _timed(self, seconds: Dict[str, float], phase: str):
        self._progress = {"phase": phase, "round": self.next_round}
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds[phase] = round(seconds.get(phase, 0.0) + time.perf_counter() - t0, 4)

    def run_round(self) -> Dict[str, Any]:
        """Select, label, train the proxy, evaluate, and commit one round. Returns its record."""
        if self.finished:
            raise RunDirError(f"run in {self.rd.path} is finished; nothing to do")
        r = self.next_round
        n = self.cfg.budget.schedule[r]
        rng = np.random.default_rng([self.cfg.seed, r])
        seconds: Dict[str, float] = {}
        strategy = self.cold_start if r == 0 or self.proxy is None else self.strategy
        with self._timed(seconds, "select"):
            chosen = strategy.select(self.pool_view(), n, rng)
        with self._timed(seconds, "label"):
            labels = self.oracle.label(chosen)
        self.labeled = {
            "id": np.concatenate([self.labeled["id"], chosen]),
            "label": np.concatenate([self.labeled["label"], labels]),
            "round": np.concatenate([self.labeled["round"], np.full(len(chosen), r, dtype=np.int64)]),
        }
        with self._timed(seconds, "proxy_train"):
            train_acc = self._train_proxy(r)
        test_acc = None
        if self.test is not None:
            with self._timed(seconds, "evaluate"):
                test_acc = float(self.proxy.score(self.test_features, self.test_labels))
        record = {
            "round": r, "n_labeled": int(len(self.labeled["id"])), "n_selected": int(len(chosen)),
            "selected_by": "random" if strategy is self.cold_start else self.cfg.strategy,
            "feature_version": self.feature_version, "refreshed": False,
            "proxy_train_accuracy": round(float(train_acc), 6),
            "proxy_test_accuracy": None if test_acc is None else round(test_acc, 6),
            "seconds": seconds,
        }
        self.summary["rounds"].append(record)
        self.next_round = r + 1
        self.summary["status"] = "finished" if self.finished else "running"
        self._commit()
        log.info("round %d: +%d labels (%s) -> %d; proxy test accuracy %s", r, len(chosen), record["selected_by"],
                 record["n_labeled"], record["proxy_test_accuracy"])
        return record

    def _commit(self) -> None:
        """Write labelled set and summary, then state.json last (the commit point)."""
        self.rd.write_labeled(self.labeled["id"], self.labeled["label"], self.labeled["round"])
        self.summary["feature_versions"] = self._feature_versions()
        self.summary["n_labeled"] = int(len(self.labeled["id"]))
        self.rd.write_summary(self.summary)
        self.rd.write_state({"next_round": self.next_round, "feature_version": self.feature_version,
                             "n_labeled": int(len(self.labeled["id"]))})

    def run(self) -> Dict[str, Any]:
        """Prepare and run every remaining round; returns the summary."""
        self.prepare()
        while not self.finished:
            self.run_round()
        return self.summary

    # ------------------------------------------------------------------ for the CLI
    def status(self) -> Dict[str, Any]:
        return {"next_round": self.next_round, "rounds": len(self.cfg.budget.schedule), "finished": self.finished,
                "n_labeled": int(len(self.labeled["id"])), "feature_version": self.feature_version,
                "path": str(self.rd.path)}

    def progress(self) -> Dict[str, Any]:
        return dict(self._progress)

    def get_summary(self) -> Dict[str, Any]:
        return self.summary

    def close(self) -> None:
        logging.getLogger("asvp_ray").removeHandler(self._log_handler)
        self._log_handler.close()
        self.rd.unlock()


def driver_actor(config: Config, out: str):
    """Start the driver as a Ray actor pinned to this node (the head, for a submitted job).

    It asks for no CPU so that it never competes with extraction actors or training workers.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    Actor = ray.remote(Driver)
    return Actor.options(num_cpus=0, max_concurrency=4,
                         scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
                         ).remote(config.model_dump(mode="json"), str(Path(out).resolve()))
