"""The driver: owns one run's state and runs its rounds. ``driver_actor`` runs it as a Ray actor.

State it owns: the labelled set (id, label, round labelled), the current feature version, the
proxy, the strategy, and the per-round random generators (``default_rng([seed, round])``, so a
resumed run draws exactly what an uninterrupted one would). The CLI only talks to it.

It keeps the round loop (select -> label -> method hook -> proxy -> evaluate -> commit), the commit
point (``state.json``, written last) and the cost ledger. What differs between methods is in
:mod:`asvp_ray.loop.methods`; feature versions in :mod:`asvp_ray.loop.versions`; the human
round in :mod:`asvp_ray.loop.human_round`.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from asvp_ray._faults import fault_env, fault_point
from asvp_ray.config import Config, dump_config, load_config, upgrade_legacy_config
from asvp_ray.data.sources import build_source
from asvp_ray.errors import ConfigError, RunDirError
from asvp_ray.features.backbones import BackboneSpec
from asvp_ray.loop.ledger import CostLedger
from asvp_ray.loop.methods import METHODS
from asvp_ray.loop.oracle import ORACLES
from asvp_ray.loop.rundir import RunDir
from asvp_ray.loop.versions import FeatureVersions
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
        try:
            self._setup()
        except BaseException:
            if hasattr(self, "_log_handler"):
                logging.getLogger("asvp_ray").removeHandler(self._log_handler)
                self._log_handler.close()
            self.rd.unlock()
            raise

    def _setup(self) -> None:
        self._log_handler = logging.FileHandler(self.rd.log_path)
        self._log_handler.setLevel(logging.INFO)
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
    def _check_config_matches(self) -> None:
        if self.rd.config_path.is_file():
            import yaml

            old = upgrade_legacy_config(yaml.safe_load(self.rd.config_path.read_text()) or {})
            try:  # keys added since the run began compare as their defaults
                old = load_config(raw=old).model_dump(mode="json")
            except ConfigError:
                pass
            diff = [k for k in config_differences(old, self.cfg.model_dump(mode="json"))
                    if not k.startswith(RESUMABLE_CHANGES)]
            if diff:
                raise RunDirError(f"{self.rd.path} holds a run made with a different config (differs in: "
                                  f"{', '.join(diff)}); resume it with the same config, or use a new --out")

    def prepare(self) -> Dict[str, Any]:
        """Extract features v0 if needed, load state, roll back uncommitted rows, rebuild the proxy."""
        state = self.rd.read_state()
        self.next_round = int(state["next_round"]) if state else 0
        self.final_done = bool(state and state.get("final_done"))
        self.open_round = state.get("open_round") if state else None
        pending_v0 = self.versions.open(int(state["feature_version"]) if state else None)
        lab = self.rd.read_labeled()
        keep = lab["round"] < self.next_round
        if self.open_round is not None:  # labels imported for the round awaiting completion
            keep |= lab["round"] == self.open_round["round"]
        if not keep.all():
            log.warning("rolling back %d label(s) of round(s) %s that were not committed", int((~keep).sum()),
                        sorted(set(lab["round"][~keep].tolist())))
        self.labeled = {k: v[keep] for k, v in lab.items()}
        self.summary = self.rd.read_summary() or self._new_summary()
        self.summary["rounds"] = [r for r in self.summary.get("rounds", []) if r["round"] < self.next_round]
        if not self.final_done:
            self.summary.pop("final", None)
        # entries of uncommitted work are dropped; a committed final model keeps its own
        self.ledger = self._new_ledger(self.summary.get("ledger"),
                                       before_round=None if self.final_done else self.next_round)
        self.ledger.add_labels(len(self.labeled["id"]))
        self.versions.charge_v0(self.ledger, pending_v0)
        self.history = self._rebuild_history()
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
            "backbone": self.cfg.backbone.name, "feature_versions": self.versions.describe(),
            "status": "running", "rounds": [],
        }

    def _rebuild_history(self):
        from asvp_ray.alignment import History, RoundState

        h = History()
        for rec in self.summary.get("rounds", []):
            h.append(RoundState(round=rec["round"], n_labeled=rec["n_labeled"], scores=rec.get("alignment") or {},
                                refreshed=bool(rec.get("refreshed")),
                                refreshed_scores=rec.get("alignment_after_refresh")))
        return h

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
        m = self.cfg.final.training_method
        if m != "auto":
            self.final_reason = f"final.training_method={m} (configured)"
            return m
        m, self.final_reason = self.method.auto_final()
        return m

    def _proxy_for_round(self, r: int) -> MLPProxy:
        p = self.cfg.proxy
        return MLPProxy(hidden=p.hidden, linear=p.linear, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
                        momentum=p.momentum, weight_decay=p.weight_decay, normalize=p.normalize, device=p.device,
                        seed=int(np.random.default_rng([self.cfg.seed, r, 1]).integers(2**31)))

    def _train_proxy(self, r: int) -> float:
        X = self.features[self.versions.rows(self.labeled["id"])]
        self.proxy = self._proxy_for_round(r).fit(X, self.labeled["label"], num_classes=len(self.classes))
        return self.proxy.score(X, self.labeled["label"])

    @contextmanager
    def _timed(self, seconds: Dict[str, float], phase: str, cpus: float = 1.0, gpus: float = 0.0,
               ledger_phase: Optional[str] = None):
        """Time a phase into the round's ``seconds`` and the cost ledger."""
        self._progress = {"phase": phase, "round": self.next_round}
        fault_point(f"phase:{phase}:r{self.next_round}")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            seconds[phase] = round(seconds.get(phase, 0.0) + dt, 4)
            self.ledger.add(ledger_phase or phase, dt, cpus=cpus, gpus=gpus, round=self.next_round)

    def _train_resources(self) -> Dict[str, float]:
        plan = self.cfg.train.plan()
        return {"cpus": plan.num_workers * plan.resources_per_worker.get("CPU", 0.0),
                "gpus": plan.num_workers * plan.resources_per_worker.get("GPU", 0.0)}

    def _finetune(self, method: str, tag: str, evaluate: bool):
        """Fine-tune the backbone on the labelled set with Ray Train; returns the FinetuneResult."""
        from asvp_ray.train.finetune import finetune

        kwargs: Dict[str, Any] = {}
        if evaluate and self.test is not None:
            kwargs = dict(eval_source=self.test, eval_ids=self.test.ids, eval_labels=self.test.labels)
        res = finetune(self.pool, self.labeled["id"], self.labeled["label"], len(self.classes), self.spec,
                       self.cfg.train, self.rd.path / "checkpoints" / tag, method=method, **kwargs)
        log.info("fine-tune %s (%s) on %d labels: %.1fs, checkpoint %s, test accuracy %s", tag, method,
                 len(self.labeled["id"]), res.seconds, res.checkpoint, res.test_accuracy)
        return res

    def pool_view(self) -> PoolView:
        mask = np.isin(self.ids, self.labeled["id"], assume_unique=True)
        return PoolView(ids=self.ids, features=self.features, labeled_mask=mask, model=self.proxy,
                        probs=self._pool_probs)

    def select_batch(self) -> Dict[str, Any]:
        """The selection half of a round: the method's pool probabilities (if any), then select.

        Returns:
            ``{"round", "ids", "selected_by", "seconds", "extra"}`` for ``complete_round``.
        """
        if self.rounds_done:
            raise RunDirError(f"all {len(self.cfg.budget.schedule)} rounds of {self.rd.path} are done; "
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
        self._commit()
        if refreshed:
            self.versions.prune()
        log.info("round %d: +%d labels (%s) -> %d; proxy test accuracy %s", r, n_new, record["selected_by"],
                 record["n_labeled"], record["proxy_test_accuracy"])
        return record

    def run_round(self) -> Dict[str, Any]:
        """One whole round with the configured (non-human) oracle. Returns its record."""
        if self.oracle is None:
            raise ConfigError(f"{self.rd.path} uses oracle: human, so rounds run one step at a time: "
                              f"`asvp-ray select {self.rd.path}`, label queries/round-K.csv, then "
                              f"`asvp-ray label {self.rd.path} FILE`")
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
        """Train the final model on the final labelled set and evaluate it on the test set."""
        method = self.final_method()
        if method == "none" or self.final_done:
            return self.summary.get("final")
        seconds: Dict[str, float] = {}
        with self._timed(seconds, "final_train", **self._train_resources()):
            res = self._finetune(method, "final", evaluate=self.test is not None)
        self.summary["final"] = {"training_method": method, "reason": self.final_reason,
                                 "test_accuracy": res.test_accuracy, "checkpoint": str(res.checkpoint),
                                 "seconds": round(seconds["final_train"], 3), "n_labeled": int(len(self.labeled["id"]))}
        self.final_done = True
        self._commit()
        log.info("final model (%s: %s): test accuracy %s", method, self.final_reason, res.test_accuracy)
        return self.summary["final"]

    def _commit(self) -> None:
        """Write labelled set and summary, then state.json last (the commit point)."""
        self.rd.write_labeled(self.labeled["id"], self.labeled["label"], self.labeled["round"])
        self.summary["feature_versions"] = self.versions.describe()
        self.summary["n_labeled"] = int(len(self.labeled["id"]))
        self.summary["status"] = "finished" if self.finished else "running"
        self.summary["cost"] = self.ledger.totals()
        self.summary["ledger"] = self.ledger.to_json()
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
    env = fault_env()
    return Actor.options(num_cpus=0, max_concurrency=4, runtime_env={"env_vars": env} if env else None,
                         scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
                         ).remote(config.model_dump(mode="json"), str(Path(out).resolve()))
