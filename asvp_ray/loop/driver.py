"""The driver: owns one run's state and runs its rounds. ``loop.actor.driver_actor`` runs it as a Ray actor.

State it owns: the labelled set (id, label, round labelled), the current feature version, the
proxy, the strategy, and the per-round random generators (``default_rng([seed, round])``, so a
resumed run draws exactly what an uninterrupted one would). The CLI only talks to it.

It keeps the round loop (select -> label -> method hook -> proxy -> evaluate -> commit), the commit
point (``state.json``, written last) and the cost ledger. What differs between methods is in
:mod:`asvp_ray.methods`; feature versions in :mod:`asvp_ray.loop.versions`; the human
round in :mod:`asvp_ray.loop.human_round`; the config check and loading the committed state on
resume in :mod:`asvp_ray.loop.resume`.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Any, Dict, Optional

import numpy as np

from asvp_ray.runtime.faults import fault_point
from asvp_ray.config import Config, dump_config, load_config
from asvp_ray.core.errors import ConfigError, RunDirError
from asvp_ray.runtime.allocator import MemoryWatch, allocator_settings, lean_arrow_memory
from asvp_ray.runtime.device import set_compute_threads
from asvp_ray.runtime.resources import node_cpus
from asvp_ray.features.backbones import BackboneSpec
from asvp_ray.storage.locations import check_storage_reachable
from asvp_ray.loop.ledger import CostLedger
from asvp_ray.methods import METHODS
from asvp_ray.data.oracle import ORACLES
from asvp_ray.loop.resume import attach_run_log, check_config_matches, detach_run_log, load_state, open_data
from asvp_ray.loop.rundir import RunDir
from asvp_ray.loop.training import finetune_labeled, final_method, run_final, train_resources
from asvp_ray.loop.versions import FeatureVersions
from asvp_ray.proxy.mlp import MLPProxy
from asvp_ray.runtime.ray_utils import quiet_ray_data
from asvp_ray.pool.view import PoolView
from asvp_ray.selection import STRATEGIES, build_strategy

log = logging.getLogger("asvp_ray.driver")


def compute_threads() -> Dict[str, Any]:
    """The threads this process computes with: torch's intra-op threads and ``OMP_NUM_THREADS``."""
    import torch

    return {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def default_threads() -> int:
    """Threads for the driver's own compute when ``driver_threads`` is not set: the CPUs Ray
    reserved for this process where it reserved some (a Tune trial's share), else every CPU of the
    node (the zero-CPU driver actor of `asvp-ray run`, or a plain process)."""
    import math

    try:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            res = ray.get_runtime_context().get_assigned_resources()
            cpus = res.get("CPU") or max([v for k, v in res.items() if k.startswith("CPU_group")] or [0])
            if cpus > 0:
                return max(1, math.ceil(cpus))
    except Exception:  # pragma: no cover - outside Ray, or an older runtime context
        pass
    return node_cpus()


def _import_runtime_modules(cfg: Config) -> None:
    """Import what the run will use before the driver's memory baseline is taken (summary.json ->
    driver_memory measures growth above it): Ray Data (extraction / the embeddings import), the
    Parquet datasets, and torch's dynamo, which the proxy's first optimiser step imports (about
    150 MB of modules, the same for every pool size); fsspec's HTTP filesystem (aiohttp), which
    Ray Data's Parquet and CSV readers import to check the paths they get; timm (about 48 MB) when
    the pool has images to extract; Ray Train (about 8 MB) and the gRPC channel that Ray Data's
    ``materialize`` opens to the raylet when the method or the final model fine-tunes."""
    import importlib

    import pyarrow.dataset  # noqa: F401
    import ray.data  # noqa: F401
    import torch._dynamo  # noqa: F401

    optional = ["fsspec.implementations.http"]
    if cfg.data.pool.kind != "embeddings":
        import timm  # noqa: F401
    if METHODS.get(cfg.method).finetunes(cfg) or cfg.final.training_method != "none":
        import ray.train.torch  # noqa: F401

        optional.append("ray._private.grpc_utils")
    for name in optional:  # what Ray imports lazily, where it is installed
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _fit_proxy(X: np.ndarray, proxy: MLPProxy, labels: np.ndarray, num_classes: int):
    """``(the proxy fitted on X, its accuracy on X)`` (run where the rows are)."""
    proxy.fit(X, labels, num_classes=num_classes)
    return proxy, proxy.score(X, labels)


class Driver:
    """Runs the rounds of one active-learning experiment in a run directory.

    Args:
        config: the validated config (or its dict form, as sent to a Ray actor).
        out: the run directory.
    """

    def __init__(self, config, out: str):
        self.cfg: Config = config if isinstance(config, Config) else load_config(raw=config)
        self.rd = RunDir(out).lock()
        try:
            self._setup()
        except BaseException:
            if hasattr(self, "_log_handler"):
                detach_run_log(self._log_handler)
            self.rd.unlock()
            raise

    def _setup(self) -> None:
        self._log_handler = attach_run_log(self.rd)
        self._progress: Dict[str, Any] = {"phase": "starting"}
        self.threads = set_compute_threads(self.cfg.driver_threads or default_threads())
        lean_arrow_memory()
        _import_runtime_modules(self.cfg)
        self.memory = MemoryWatch()  # after imports: the baseline growth is measured from
        quiet_ray_data()
        check_config_matches(self.rd, self.cfg)
        check_storage_reachable(self.cfg.storage)
        with self.memory.phase("open_data"):
            self.pool, self.test, self.classes = open_data(self.cfg)
        self.strategy = build_strategy(self.cfg.strategy, self.cfg.strategy_options)
        self.rd.write_config(dump_config(self.cfg))  # every check passed: record what this run is
        self.cold_start = STRATEGIES.create("random")
        self.oracle = ORACLES.create(self.cfg.oracle, source=self.pool)  # None: human labellers
        self.spec = BackboneSpec(**self.cfg.backbone.model_dump())
        self.proxy: Optional[MLPProxy] = None
        self.method = METHODS.create(self.cfg.method, driver=self)
        self.policy = self.method.refresh_policy()
        self.versions = FeatureVersions(self.rd, self.cfg, self.pool, self.test, self.spec, self._set_progress)
        self._pool_probs: Optional[np.ndarray] = None  # the method's pool probabilities this round
        self.ledger = self._new_ledger()
        self.history = None
        self.final_done = False
        self.open_round: Optional[Dict[str, Any]] = None  # human oracle: the round awaiting labels
        self.summary: Dict[str, Any] = {}
        self.labeled = {k: np.zeros(0, dtype=np.int64) for k in ("id", "label", "round")}
        self.next_round = 0

    def _new_ledger(self, data: Optional[Dict[str, Any]] = None, before_round: Optional[int] = None) -> CostLedger:
        c = self.cfg.cost
        return CostLedger.from_json(data, c.per_label, c.per_cpu_hour, c.per_gpu_hour, before_round=before_round)

    # ------------------------------------------------------------------ set-up and resume
    def prepare(self) -> Dict[str, Any]:
        """Extract features v0 if needed, load state, roll back uncommitted rows (see
        :func:`asvp_ray.loop.resume.load_state`), rebuild the proxy."""
        with self.memory.phase("prepare"):
            load_state(self)
        if self.next_round > 0:
            self._train_proxy(self.next_round - 1)
        self.summary["status"] = "finished" if self.finished else "running"
        self._commit()
        return self.status()

    def _set_progress(self, progress: Dict[str, Any]) -> None:
        self._progress = progress

    # The current feature version (owned by ``self.versions``).
    feature_version = property(lambda self: self.versions.current, doc="the current feature version")
    ids = property(lambda self: self.versions.ids, doc="sorted pool ids, in feature-row order")
    features = property(lambda self: self.versions.features, doc="the current pool features (N, D)")

    # ------------------------------------------------------------------ the rounds
    @property
    def rounds_done(self) -> bool:
        return self.next_round >= len(self.cfg.budget.schedule)

    @property
    def finished(self) -> bool:
        return self.rounds_done and (self.final_done or self.final_method() == "none")

    def final_method(self) -> str:
        """The final training method and (via ``final_reason``) why, following ASVP.md."""
        m, self.final_reason = final_method(self.cfg, self.method, self.pool)
        return m

    def _proxy_for_round(self, r: int) -> MLPProxy:
        p = self.cfg.proxy
        return MLPProxy(hidden=p.hidden, linear=p.linear, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
                        momentum=p.momentum, weight_decay=p.weight_decay, normalize=p.normalize, device=p.device,
                        seed=int(np.random.default_rng([self.cfg.seed, r, 1]).integers(2**31)))

    def _train_proxy(self, r: int) -> float:
        """Train this round's proxy on the labelled rows; returns its training accuracy. With the
        pool in shard actors and the proxy on the CPU, it trains in a Ray task that reads the
        labelled rows from the shards (the rows and the training's working memory never enter
        the driver; the fitted proxy comes back), on the driver's thread count: the same proxy."""
        from asvp_ray.proxy.mlp import _resolve_device

        proxy, labels = self._proxy_for_round(r), self.labeled["label"]
        shards = self.versions.shards
        if shards is not None and len(labels) and _resolve_device(proxy.device).type == "cpu":
            from asvp_ray.pool.store_shards import compute_on_rows

            self.proxy, acc = compute_on_rows(shards, [self.versions.rows(self.labeled["id"])], _fit_proxy, proxy,
                                              labels, len(self.classes))
            return acc
        X = self.versions.features_of(self.labeled["id"])
        self.proxy = proxy.fit(X, labels, num_classes=len(self.classes))
        return self.proxy.score(X, labels)

    @contextmanager
    def _timed(self, seconds: Dict[str, float], phase: str, cpus: float = 1.0, gpus: float = 0.0,
               ledger_phase: Optional[str] = None):
        """Time a phase into the round's ``seconds`` and the cost ledger."""
        self._progress = {"phase": phase, "round": self.next_round}
        fault_point(f"phase:{phase}:r{self.next_round}")
        t0 = time.perf_counter()
        try:
            with self.memory.phase(phase):
                yield
        finally:
            dt = time.perf_counter() - t0
            seconds[phase] = round(seconds.get(phase, 0.0) + dt, 4)
            self.ledger.add(ledger_phase or phase, dt, cpus=cpus, gpus=gpus, round=self.next_round)

    def _train_resources(self) -> Dict[str, float]:
        return train_resources(self.cfg.train)

    def _finetune(self, method: str, tag: str, evaluate: bool):
        """Fine-tune on the labelled set (see :func:`asvp_ray.loop.training.finetune_labeled`)."""
        return finetune_labeled(self, method, tag, evaluate)

    def pool_view(self) -> PoolView:
        # self.ids is sorted: look the labelled ids up (np.isin sorts a copy of both: ~30 MB at 1M rows)
        mask = np.zeros(len(self.ids), dtype=bool)
        lab = self.labeled["id"]
        if len(lab) and len(self.ids):
            pos = np.minimum(np.searchsorted(self.ids, lab), len(self.ids) - 1)
            mask[pos[self.ids[pos] == lab]] = True
        return PoolView(ids=self.ids, features=self.features, shards=self.versions.shards, labeled_mask=mask,
                        model=self.proxy,
                        probs=self._pool_probs)

    def select_batch(self) -> Dict[str, Any]:
        """The selection half of a round: the method's pool probabilities (if any), then select.

        Returns:
            ``{"round", "ids", "selected_by", "seconds", "extra"}`` for ``complete_round``.
        """
        if self.rounds_done:
            raise RunDirError(f"all {len(self.cfg.budget.schedule)} rounds of {self.rd.location} are done; "
                              "nothing to select (extend budget.schedule in a new run to buy more)")
        r = self.next_round
        n = self.cfg.budget.schedule[r]
        rng = np.random.default_rng([self.cfg.seed, r])
        seconds: Dict[str, float] = {}
        extra: Dict[str, Any] = {}
        first = r == 0 or self.proxy is None
        if not first:
            probs = self.method.pool_probs(seconds, extra)
            if probs is not None:
                self._pool_probs = probs
        strategy = self.cold_start if first else self.strategy
        with self._timed(seconds, "select", ledger_phase="score_select"):
            chosen = strategy.select(self.pool_view(), n, rng)
        return {"round": r, "ids": chosen, "selected_by": "random" if first else self.cfg.strategy,
                "seconds": seconds, "extra": extra}

    def add_labels(self, ids: np.ndarray, labels: np.ndarray, r: int) -> None:
        """Append bought labels to the labelled set (in memory; committed with the round)."""
        self.ledger.add_labels(len(ids))
        self.labeled = {
            "id": np.concatenate([self.labeled["id"], np.asarray(ids, dtype=np.int64)]),
            "label": np.concatenate([self.labeled["label"], np.asarray(labels, dtype=np.int64)]),
            "round": np.concatenate([self.labeled["round"], np.full(len(ids), r, dtype=np.int64)]),
        }

    def complete_round(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """The half of a round after its labels arrived: the method's hook (asvp: monitor, maybe
        refresh), train the proxy, evaluate, record and commit. Returns the round's record."""
        r, seconds, extra = batch["round"], dict(batch["seconds"]), dict(batch["extra"])
        refreshed = self.method.after_labels(r, seconds, extra)
        with self._timed(seconds, "proxy_train"):
            train_acc = self._train_proxy(r)
        test_acc = None
        if self.test is not None:
            with self._timed(seconds, "evaluate"):
                test_acc = float(self.proxy.score(self.versions.test_features, self.versions.test_labels))
        n_new = int((self.labeled["round"] == r).sum())
        record = {
            "round": r, "n_labeled": int(len(self.labeled["id"])), "n_selected": int(len(batch["ids"])),
            "n_labels_bought": n_new, "selected_by": batch["selected_by"],
            "feature_version": self.feature_version, "refreshed": refreshed,
            "proxy_train_accuracy": round(float(train_acc), 6),
            "proxy_test_accuracy": None if test_acc is None else round(test_acc, 6),
            "seconds": seconds, **extra,
        }
        self.summary["rounds"].append(record)
        self.next_round = r + 1
        self.open_round = None
        line = ("round %d: +%d labels (%s) -> %d; proxy test accuracy %s", r, n_new, record["selected_by"],
                record["n_labeled"], record["proxy_test_accuracy"])
        if self.rd.bucket is not None:  # its run.log is uploaded with the commit: the round's line goes in it
            log.info(*line)
        self._commit()
        if refreshed:
            self.versions.prune()
        if self.rd.bucket is None:  # a local log is appended at once: the line follows the commit
            log.info(*line)
        return record

    def run_round(self) -> Dict[str, Any]:
        """One whole round with the configured (non-human) oracle. Returns its record."""
        if self.oracle is None:
            raise ConfigError(f"{self.rd.location} uses oracle: human, so rounds run one step at a time: "
                              f"`asvp-ray select {self.rd.location}`, label queries/round-K.csv, then "
                              f"`asvp-ray label {self.rd.location} FILE`")
        batch = self.select_batch()
        with self._timed(batch["seconds"], "label", cpus=0.0):
            labels = self.oracle.label(batch["ids"])
        self.add_labels(batch["ids"], labels, batch["round"])
        return self.complete_round(batch)

    def human_select(self, close: bool = False) -> Dict[str, Any]:
        """Close the open round (if any) and open the next one for human labellers
        (see :func:`asvp_ray.loop.human_round.human_select`)."""
        from asvp_ray.loop.human_round import human_select

        return human_select(self, close=close)

    def run_final(self) -> Optional[Dict[str, Any]]:
        """Train and evaluate the final model (see :func:`asvp_ray.loop.training.run_final`)."""
        return run_final(self)

    def _commit(self) -> None:
        """Write labelled set and summary, then state.json last (the commit point)."""
        self.rd.write_labeled(self.labeled["id"], self.labeled["label"], self.labeled["round"])
        self.summary["feature_versions"] = self.versions.describe()
        self.summary["n_labeled"] = int(len(self.labeled["id"]))
        self.summary["status"] = "finished" if self.finished else "running"
        self.summary["cost"] = self.ledger.totals()
        self.summary["ledger"] = self.ledger.to_json()
        self.summary["driver_memory"] = self.memory.summary()
        self.rd.write_summary(self.summary)
        self.rd.write_state({"next_round": self.next_round, "feature_version": self.feature_version,
                             "n_labeled": int(len(self.labeled["id"])), "final_done": self.final_done,
                             "open_round": self.open_round})

    def run(self) -> Dict[str, Any]:
        """Prepare and run every remaining round; returns the summary."""
        self.prepare()
        while not self.rounds_done:
            self.run_round()
        self.run_final()
        return self.summary

    # ------------------------------------------------------------------ for the CLI
    def status(self) -> Dict[str, Any]:
        return {"next_round": self.next_round, "rounds": len(self.cfg.budget.schedule), "finished": self.finished,
                "rounds_done": self.rounds_done,
                "n_labeled": int(len(self.labeled["id"])), "feature_version": self.feature_version,
                "path": self.rd.location, "compute_threads": compute_threads(), "allocators": allocator_settings()}

    def progress(self) -> Dict[str, Any]:
        return dict(self._progress)

    def get_summary(self) -> Dict[str, Any]:
        return self.summary

    def close(self) -> None:
        if hasattr(self, "versions"):
            self.versions.release_shards()
        detach_run_log(self._log_handler)
        self.rd.unlock()

