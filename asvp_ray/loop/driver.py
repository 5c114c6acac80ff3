"""The driver: owns one run's state and runs its rounds. ``loop.actor.driver_actor`` runs it as a Ray actor.

State it owns: the labelled set (id, label, round labelled), the current feature version, the
proxy, the strategy, and the per-round random generators (``default_rng([seed, round])``, so a
resumed run draws exactly what an uninterrupted one would). The CLI only talks to it.

It keeps the round loop (select -> label -> method hook -> proxy -> evaluate -> commit), the commit
point (``state.json``, written last) and the cost ledger. What differs between methods is in
:mod:`asvp_ray.methods`: a method is built with the driver as its
:class:`~asvp_ray.methods.context.RoundContext` (``cfg``, ``next_round``, ``labeled``,
``versions``, ``history``, ``ledger``, ``round_records``, ``timed``, ``train_resources``,
``finetune``, ``predict_pool``, ``embed_labeled``) and uses nothing else of it. Feature versions
are in :mod:`asvp_ray.loop.versions`; the proxy and the round record in :mod:`asvp_ray.loop.rounds`;
fine-tunes and the final model in :mod:`asvp_ray.loop.training`; the human round in
:mod:`asvp_ray.loop.human_round`; the config check and the committed state on resume in
:mod:`asvp_ray.loop.resume`. These modules use the driver's public members only.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from asvp_ray.runtime.faults import fault_point
from asvp_ray.config import Config, dump_config, load_config
from asvp_ray.core.errors import ConfigError, RunDirError
from asvp_ray.runtime.allocator import MemoryWatch, allocator_settings, lean_arrow_memory
from asvp_ray.runtime.device import set_compute_threads
from asvp_ray.features.backbones import BackboneSpec
from asvp_ray.storage.locations import check_storage_reachable
from asvp_ray.methods import METHODS
from asvp_ray.data.oracle import ORACLES
from asvp_ray.loop import training
from asvp_ray.loop.process import compute_threads, default_threads, import_runtime_modules
from asvp_ray.loop.resume import attach_run_log, check_config_matches, detach_run_log, load_state, new_ledger, open_data
from asvp_ray.loop.rounds import labeled_mask, proxy_for_round, round_record, train_proxy
from asvp_ray.loop.rundir import RunDir
from asvp_ray.loop.versions import FeatureVersions
from asvp_ray.proxy.mlp import MLPProxy
from asvp_ray.runtime.ray_utils import quiet_ray_data
from asvp_ray.pool.view import PoolView
from asvp_ray.selection import STRATEGIES, build_strategy

log = logging.getLogger("asvp_ray.driver")


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
        import_runtime_modules(self.cfg)
        self.memory = MemoryWatch()  # after imports: the baseline growth is measured from
        quiet_ray_data()
        check_config_matches(self.rd, self.cfg)
        check_storage_reachable(self.cfg.storage)
        with self.memory.phase("open_data"):
            self.pool, self.test, self.classes = open_data(self.cfg, index_dir=self.rd.path / "index")
        self.strategy = build_strategy(self.cfg.strategy, self.cfg.strategy_options)
        self.rd.write_config(dump_config(self.cfg))  # every check passed: record what this run is
        self.cold_start = STRATEGIES.create("random")
        self.oracle = ORACLES.create(self.cfg.oracle, source=self.pool)  # None: human labellers
        self.spec = BackboneSpec(**self.cfg.backbone.model_dump())
        self.proxy: Optional[MLPProxy] = None
        self.method = METHODS.create(self.cfg.method, ctx=self)  # builds its refresh policy: checks `refresh`
        self.versions = FeatureVersions(self.rd, self.cfg, self.pool, self.test, self.spec, self._set_progress)
        self._pool_probs: Optional[np.ndarray] = None  # the method's pool probabilities this round
        self.ledger = new_ledger(self.cfg)
        self.history = None
        self.final_done = False
        self.open_round: Optional[Dict[str, Any]] = None  # human oracle: the round awaiting labels
        self.summary: Dict[str, Any] = {}
        self.labeled = {k: np.zeros(0, dtype=np.int64) for k in ("id", "label", "round")}
        self.next_round = 0

    # ------------------------------------------------------------------ set-up and resume
    def prepare(self) -> Dict[str, Any]:
        """Extract features v0 if needed, load state, roll back uncommitted rows (see
        :func:`asvp_ray.loop.resume.load_state`), rebuild the proxy."""
        with self.memory.phase("prepare"):
            s = load_state(self.rd, self.cfg, self.versions, self.pool, self.test, self.classes)
        self.next_round, self.final_done, self.open_round = s.next_round, s.final_done, s.open_round
        self.labeled, self.summary, self.ledger, self.history = s.labeled, s.summary, s.ledger, s.history
        if self.next_round > 0:
            self._train_proxy(self.next_round - 1)
        self.summary["status"] = "finished" if self.finished else "running"
        self.commit()
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
        """The final training method, following ASVP.md (:func:`asvp_ray.loop.training.final_method`)."""
        return training.final_method(self.cfg, self.method, self.pool)[0]

    def _train_proxy(self, r: int) -> float:
        """Train round ``r``'s proxy on the labelled rows (:func:`asvp_ray.loop.rounds.train_proxy`);
        returns its training accuracy."""
        self.proxy, acc = train_proxy(proxy_for_round(self.cfg, r), self.versions, self.labeled, len(self.classes))
        return acc

    # ------------------------------------------------------------------ the methods' RoundContext
    def round_records(self) -> List[Dict[str, Any]]:
        return self.summary.get("rounds", [])

    @contextmanager
    def timed(self, seconds: Dict[str, float], phase: str, cpus: float = 1.0, gpus: float = 0.0,
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

    def train_resources(self) -> Dict[str, float]:
        return training.train_resources(self.cfg.train)

    def finetune(self, method: str, tag: str, evaluate: bool):
        """Fine-tune on the labelled set (see :func:`asvp_ray.loop.training.finetune_labeled`)."""
        return training.finetune_labeled(self, method, tag, evaluate)

    def predict_pool(self, checkpoint) -> Tuple[np.ndarray, np.ndarray]:
        return training.predict_pool(self, checkpoint)

    def embed_labeled(self, checkpoint) -> Tuple[np.ndarray, np.ndarray]:
        return training.embed_labeled(self, checkpoint)

    # ------------------------------------------------------------------ a round
    def pool_view(self) -> PoolView:
        return PoolView(ids=self.ids, features=self.features, shards=self.versions.shards,
                        labeled_mask=labeled_mask(self.ids, self.labeled["id"]), model=self.proxy,
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
        with self.timed(seconds, "select", ledger_phase="score_select"):
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
        with self.timed(seconds, "proxy_train"):
            train_acc = self._train_proxy(r)
        test_acc = None
        if self.test is not None:
            with self.timed(seconds, "evaluate"):
                test_acc = float(self.proxy.score(self.versions.test_features, self.versions.test_labels))
        record = round_record(batch, self.labeled, self.feature_version, refreshed, train_acc, test_acc, seconds, extra)
        self.summary["rounds"].append(record)
        self.next_round = r + 1
        self.open_round = None
        line = ("round %d: +%d labels (%s) -> %d; proxy test accuracy %s", r, record["n_labels_bought"],
                record["selected_by"], record["n_labeled"], record["proxy_test_accuracy"])
        if self.rd.bucket is not None:  # its run.log is uploaded with the commit: the round's line goes in it
            log.info(*line)
        self.commit()
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
        with self.timed(batch["seconds"], "label", cpus=0.0):
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
        return training.run_final(self)

    def commit(self) -> None:
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

