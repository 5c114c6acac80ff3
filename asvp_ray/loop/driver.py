"""The driver: owns one run's state and runs its rounds. ``DriverActor`` is it as a Ray actor.

State it owns: the labelled set (id, label, round labelled), the current feature version, the
proxy, the strategy, and the per-round random generators (``default_rng([seed, round])``, so a
resumed run draws exactly what an uninterrupted one would). The CLI only talks to it.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from asvp_ray._faults import fault_env, fault_point
from asvp_ray.config import Config, dump_config, load_config, upgrade_legacy_config
from asvp_ray.data.sources import build_source
from asvp_ray.errors import ConfigError, RunDirError
from asvp_ray.features.backbones import BackboneSpec
from asvp_ray.features.extract import extract_to_store
from asvp_ray.loop.ledger import CostLedger
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
        self.oracle = ORACLES.create("simulated", source=self.pool) if self.cfg.oracle == "simulated" else None
        self.spec = BackboneSpec(**self.cfg.backbone.model_dump())
        self.proxy: Optional[MLPProxy] = None
        self.policy = self._make_policy()
        self.ledger = self._new_ledger()
        self.history = None
        self.final_done = False
        self.open_round: Optional[Dict[str, Any]] = None  # human oracle: the round awaiting labels
        self.feature_version: Optional[int] = None
        self.summary: Dict[str, Any] = {}
        self.labeled = {k: np.zeros(0, dtype=np.int64) for k in ("id", "label", "round")}
        self.next_round = 0

    def _make_policy(self):
        from asvp_ray.alignment import REFRESH_POLICIES

        rc = self.cfg.refresh
        if self.cfg.method != "asvp":
            return REFRESH_POLICIES.create("never")
        kwargs: Dict[str, Any] = {}
        if rc.policy == "at_labels":
            if not rc.at:
                raise ConfigError("refresh.policy: at_labels needs refresh.at, e.g. refresh.at: [1000, 5000]")
            kwargs = {"at": list(rc.at)}
        elif rc.policy == "score_drop":
            kwargs = {"score": rc.score, "threshold": rc.threshold, "min_new_labels": rc.min_new_labels,
                      "max_refreshes": rc.max_refreshes}
        elif rc.policy == "probe":
            kwargs = {"score": rc.score, "margin": rc.margin, "max_refreshes": rc.max_refreshes}
        if rc.policy in ("score_drop", "probe") and rc.score not in self.cfg.monitor.scores:
            raise ConfigError(f"refresh.score {rc.score!r} is not computed by the monitor "
                              f"(monitor.scores = {self.cfg.monitor.scores}); add it there")
        return REFRESH_POLICIES.create(rc.policy, **kwargs)

    def _new_ledger(self, data: Optional[Dict[str, Any]] = None, before_round: Optional[int] = None) -> CostLedger:
        c = self.cfg.cost
        return CostLedger.from_json(data, c.per_label, c.per_cpu_hour, c.per_gpu_hour, before_round=before_round)

    # ------------------------------------------------------------------ set-up and resume
    def _check_config_matches(self) -> None:
        if self.rd.config_path.is_file():
            import yaml

            old = upgrade_legacy_config(yaml.safe_load(self.rd.config_path.read_text()) or {})
            diff = [k for k in config_differences(old, self.cfg.model_dump(mode="json"))
                    if not k.startswith(RESUMABLE_CHANGES)]
            if diff:
                raise RunDirError(f"{self.rd.path} holds a run made with a different config (differs in: "
                                  f"{', '.join(diff)}); resume it with the same config, or use a new --out")

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
        self.final_done = bool(state and state.get("final_done"))
        self.open_round = state.get("open_round") if state else None
        if self.feature_version is None:
            self.feature_version = 0
            if 0 not in store.versions():
                t0 = time.perf_counter()
                self._extract_v0_or_reuse()
                self._pending_extract = time.perf_counter() - t0
        for v in store.versions():
            if v > self.feature_version:  # written by a refresh that never committed
                log.warning("removing feature version v%d: its refresh was not committed", v)
                store.remove(v)
        self._load_features()
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
        if getattr(self, "_pending_extract", None):
            self.ledger.add("extract", self._pending_extract, **self._extract_resources())
            self._pending_extract = None
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
        from asvp_ray.features.extract import resolve_compute
        from asvp_ray.features.store import (FeatureStore, cache_key, check_cached_compute, legacy_cache_entries,
                                             link_version)

        if not self.cfg.feature_cache:
            return self._extract(0)
        compute = resolve_compute(self.cfg.extract)
        key = cache_key(self._cache_inputs(), device=compute.device, precision=compute.precision)
        cache = FeatureStore(Path(self.cfg.feature_cache) / key)
        if 0 not in cache.versions():
            old = legacy_cache_entries(Path(self.cfg.feature_cache))
            if old:
                log.warning("feature cache %s holds %d entr%s made before device and precision were part of the "
                            "key (%s); they are not reused (delete them to free the space)", self.cfg.feature_cache,
                            len(old), "y" if len(old) == 1 else "ies", ", ".join(p.name for p in old))
            log.info("feature cache %s has no features for this backbone, data, device (%s) and precision (%s); "
                     "extracting", cache.root, compute.device, compute.precision)
            self._extract(0, compute=compute)
            try:
                link_version(self.rd.store.path(0), cache, 0)
            except OSError as e:  # another run cached it first: theirs is identical
                log.info("feature cache not updated (%s)", e)
        else:
            check_cached_compute(cache.meta(0), compute.device, compute.precision, cache.path(0))
            log.info("reusing features v0 from the feature cache %s (%s, %s)", cache.path(0), compute.device,
                     compute.precision)
            link_version(cache.path(0), self.rd.store, 0)

    def _extract(self, version: int, checkpoint: Optional[str] = None, compute=None) -> None:
        self._progress = {"phase": f"extract v{version}", "total": len(self.pool) + (len(self.test or []))}
        log.info("extracting feature version v%d (%d pool + %d test images, %s)", version, len(self.pool),
                 len(self.test) if self.test is not None else 0, self.spec.name)
        meta = extract_to_store(self.rd.store, version, self.pool, self.spec, self.cfg.extract, test=self.test,
                                checkpoint=checkpoint, skip_unreadable=self.cfg.data.skip_unreadable,
                                extra_meta={"run": str(self.rd.path)}, compute=compute)
        log.info("feature version v%d: %d x %d in %.1fs", version, meta["rows"], meta["dim"], meta["seconds"])

    def _extract_resources(self) -> Dict[str, float]:
        from asvp_ray.features.extract import plan_actors

        plan = plan_actors(self.cfg.extract)
        return {"cpus": plan.num_actors * plan.num_cpus + 1.0, "gpus": plan.num_actors * plan.num_gpus}

    def _rebuild_history(self):
        from asvp_ray.alignment import History, RoundState

        h = History()
        for rec in self.summary.get("rounds", []):
            h.append(RoundState(round=rec["round"], n_labeled=rec["n_labeled"], scores=rec.get("alignment") or {},
                                refreshed=bool(rec.get("refreshed")),
                                refreshed_scores=rec.get("alignment_after_refresh")))
        return h

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
        if self.cfg.method != "asvp":
            self.final_reason = f"auto: {self.cfg.method} trains the final model with FT"
            return "ft"
        refreshed = any(r.get("refreshed") for r in self.summary.get("rounds", []))
        if refreshed:
            self.final_reason = "auto: features were refreshed, so FT (the labelled set is large enough to move them)"
            return "ft"
        self.final_reason = "auto: features were never refreshed, so LP-FT keeps the pre-trained information"
        return "lpft"

    def _proxy_for_round(self, r: int) -> MLPProxy:
        p = self.cfg.proxy
        return MLPProxy(hidden=p.hidden, linear=p.linear, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
                        momentum=p.momentum, weight_decay=p.weight_decay, normalize=p.normalize, device=p.device,
                        seed=int(np.random.default_rng([self.cfg.seed, r, 1]).integers(2**31)))

    def _train_proxy(self, r: int) -> float:
        X = self.features[self._rows(self.labeled["id"])]
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

    def _monitor(self) -> Dict[str, float]:
        """Alignment scores of the current features on the labelled set (seeded subsamples)."""
        from asvp_ray.alignment import alignment_scores

        m = self.cfg.monitor
        rng = np.random.default_rng([self.cfg.seed, self.next_round, 2])
        take = np.arange(len(self.labeled["id"]))
        if len(take) > m.max_rows:
            take = np.sort(rng.choice(take, m.max_rows, replace=False))
        feats = self.features[self._rows(self.labeled["id"][take])]
        labels = self.labeled["label"][take]
        ref = self.features
        if len(ref) > m.reference_rows:
            ref = ref[np.sort(rng.choice(len(ref), m.reference_rows, replace=False))]
        return {k: round(float(v), 6) for k, v in alignment_scores(feats, labels, reference=ref,
                                                                    scores=tuple(m.scores)).items()}

    def _refresh(self, seconds: Dict[str, float]) -> Dict[str, Any]:
        """Fine-tune on the labelled set, re-extract pool and test into v{k+1}, switch to it."""
        new_v = self.feature_version + 1
        res_t = self._train_resources()
        with self._timed(seconds, "refresh_finetune", **res_t):
            res = self._finetune("ft", f"refresh-v{new_v}", evaluate=False)
        with self._timed(seconds, "refresh_extract", **self._extract_resources()):
            self._extract(new_v, checkpoint=res.checkpoint)
        self.feature_version = new_v
        self._load_features()
        return {"version": new_v, "checkpoint": str(res.checkpoint), "finetune_seconds": seconds["refresh_finetune"],
                "extract_seconds": seconds["refresh_extract"]}

    def _standard_scores(self, seconds: Dict[str, float]) -> Dict[str, Any]:
        """Standard AL: fine-tune on the labelled set, then score the whole pool with backbone + head."""
        from asvp_ray.train.finetune import predict_proba

        r = self.next_round
        with self._timed(seconds, "finetune", **self._train_resources()):
            res = self._finetune("ft", f"round-{r}", evaluate=self.test is not None)
        with self._timed(seconds, "score_pool", **self._extract_resources()):
            ids, probs = predict_proba(self.pool, self.ids, res.checkpoint, self.spec, self.cfg.extract)
        order = np.argsort(ids)
        if not np.array_equal(ids[order], self.ids):
            raise RunDirError("standard AL scoring returned ids that do not match the feature store's pool")
        self._standard_probs = probs[order]
        return {"finetune_test_accuracy": res.test_accuracy, "checkpoint": str(res.checkpoint)}

    def pool_view(self) -> PoolView:
        mask = np.isin(self.ids, self.labeled["id"], assume_unique=True)
        probs = getattr(self, "_standard_probs", None) if self.cfg.method == "standard" else None
        return PoolView(ids=self.ids, features=self.features, labeled_mask=mask, model=self.proxy, probs=probs)

    def select_batch(self) -> Dict[str, Any]:
        """The selection half of a round: (standard: fine-tune and score the pool), then select.

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
        if self.cfg.method == "standard" and not first:
            extra.update(self._standard_scores(seconds))
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
        """The half of a round after its labels arrived: (asvp: monitor, maybe refresh), train the
        proxy, evaluate, record and commit. Returns the round's record."""
        from asvp_ray.alignment import RoundState

        r, seconds, extra = batch["round"], dict(batch["seconds"]), dict(batch["extra"])
        refreshed = False
        if self.cfg.method == "asvp":
            with self._timed(seconds, "monitor"):
                scores = self._monitor()
            self.history.append(RoundState(round=r, n_labeled=int(len(self.labeled["id"])), scores=scores))
            probe = self._probe_fn(seconds) if getattr(self.policy, "requires_probe", False) else None
            decision = self.policy.decide(self.history, probe=probe)
            extra.update({"alignment": scores, "decision": decision.reason, "decision_scores": decision.scores})
            log.info("round %d alignment %s -> %s", r, scores, decision.reason)
            if decision.refresh:
                extra["refresh"] = self._refresh(seconds)
                with self._timed(seconds, "monitor"):
                    after = self._monitor()
                extra["alignment_after_refresh"] = after
                self.history.mark_refreshed(True, refreshed_scores=after)
                refreshed = True
            else:
                self.history.mark_refreshed(False)
        with self._timed(seconds, "proxy_train"):
            train_acc = self._train_proxy(r)
        test_acc = None
        if self.test is not None:
            with self._timed(seconds, "evaluate"):
                test_acc = float(self.proxy.score(self.test_features, self.test_labels))
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
            self._prune_versions()
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
        """Close the open round (if any) and open the next one for human labellers.

        Args:
            close: close the open round even though some of its ids are still unlabelled (they
                return to the pool, unbought).

        Returns:
            ``{"closed": record or None, "opened": {...} or None, "done": bool}``.

        Raises:
            RunDirError: the open round still has pending ids and ``close`` is False.
        """
        from asvp_ray.loop.human import pending_ids, write_queries

        out: Dict[str, Any] = {"closed": None, "opened": None, "done": False}
        if self.open_round is not None:
            r = self.open_round["round"]
            pend = pending_ids(self.rd)
            n_done = int((self.labeled["round"] == r).sum())
            if len(pend) and not close:
                raise RunDirError(
                    f"round {r} still has {len(pend)} pending id(s) (queries/round-{r}.csv); import their labels "
                    f"with `asvp-ray label {self.rd.path} FILE`, or pass --close to close round {r} with the "
                    f"{n_done} label(s) it has")
            if n_done == 0:
                raise RunDirError(f"round {r} has no labels yet; import some with `asvp-ray label` before closing it")
            batch = dict(self.open_round, ids=np.asarray(self.open_round["ids"], dtype=np.int64))
            out["closed"] = self.complete_round(batch)
        if self.rounds_done:
            out["done"] = True
            return out
        batch = self.select_batch()
        files = write_queries(self.rd, batch["round"], batch["ids"], self.pool.paths(batch["ids"]), self.classes)
        self.open_round = {"round": batch["round"], "ids": batch["ids"].tolist(), "selected_by": batch["selected_by"],
                           "seconds": batch["seconds"], "extra": batch["extra"]}
        self._commit()
        out["opened"] = {"round": batch["round"], "n": int(len(batch["ids"])), "selected_by": batch["selected_by"],
                         "files": [str(f) for f in files]}
        log.info("round %d opened: %d ids for labellers in %s", batch["round"], len(batch["ids"]), files[0])
        return out

    def _probe_fn(self, seconds: Dict[str, float]):
        """For the probe policy: a cheap fine-tune, features of the labelled set only, their scores."""

        def probe(history) -> Dict[str, float]:
            from asvp_ray.alignment import alignment_scores
            from asvp_ray.features.extract import extract

            with self._timed(seconds, "probe", **self._train_resources()):
                res = self._finetune("ft", f"probe-r{self.next_round}", evaluate=False)
                chunks = list(extract(self.pool, self.spec, self.cfg.extract, ids=self.labeled["id"],
                                      checkpoint=res.checkpoint))
            ids = np.concatenate([c[0] for c in chunks])
            feats = np.concatenate([c[1] for c in chunks])
            order = np.argsort(ids)
            lab_order = np.argsort(self.labeled["id"])
            return alignment_scores(feats[order], self.labeled["label"][lab_order],
                                    reference=None, scores=tuple(self.cfg.monitor.scores))

        return probe

    def _prune_versions(self) -> None:
        """Keep v0, the current version and the newest ``refresh.keep_versions`` (0 = keep all);
        called only after the state that stops referencing the others is committed."""
        keep = self.cfg.refresh.keep_versions
        if keep <= 0:
            return
        versions = [v for v in self.rd.store.versions() if v not in (0, self.feature_version)]
        for v in versions[:-keep] if len(versions) > keep else []:
            log.info("removing feature version v%d (refresh.keep_versions=%d)", v, keep)
            self.rd.store.remove(v)

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
        self.summary["feature_versions"] = self._feature_versions()
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
