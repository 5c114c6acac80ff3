"""Opening a run directory, new or resumed: its run log, the config check, the data sources and
the budget check (before anything is written), and loading the committed state (a
:class:`CommittedState` the driver takes over).

``state.json`` is the commit point (written last by ``Driver.commit``). On resume everything
after it is rolled back: labels of uncommitted rounds, their summary records and their cost
ledger entries; the alignment history is rebuilt from the committed round records.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from asvp_ray.config import load_config, upgrade_legacy_config
from asvp_ray.data.sources import build_source
from asvp_ray.core.errors import ConfigError, RunDirError
from asvp_ray.loop.ledger import CostLedger

log = logging.getLogger("asvp_ray.driver")

# Config sections that may change between a run and its resume (they do not change results).
RESUMABLE_CHANGES = ("extract", "driver_threads", "pool_shards")


def attach_run_log(rd) -> logging.Handler:
    """Send the ``asvp_ray`` loggers' INFO records to the run's ``run.log`` too."""
    from asvp_ray.core.redact import RedactingFormatter

    handler = logging.FileHandler(rd.log_path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("asvp_ray").addHandler(handler)
    logging.getLogger("asvp_ray").setLevel(logging.INFO)
    return handler


def detach_run_log(handler: logging.Handler) -> None:
    logging.getLogger("asvp_ray").removeHandler(handler)
    handler.close()


def open_data(cfg, index_dir=None) -> Tuple[Any, Optional[Any], List[str]]:
    """``(pool, test or None, class names)`` of the config, checked against the budget and the
    oracle (a simulated one needs every pool label). Indexed sources keep their index in
    ``index_dir`` (the run's ``index/``)."""
    pool = build_source(cfg.data.pool, cfg.data.classes, index_dir=index_dir)
    test = build_source(cfg.data.test, cfg.data.classes, index_dir=index_dir) if cfg.data.test else None
    classes = cfg.data.classes or pool.classes
    if not classes:
        raise ConfigError("the pool has no class names; list them in data.classes")
    if cfg.oracle == "simulated" and hasattr(pool, "check_labels_for_oracle"):
        pool.check_labels_for_oracle()
    if getattr(pool, "kind", "") == "embeddings":
        check_embeddings_pool(cfg, pool, test)
    schedule = cfg.budget.schedule
    if sum(schedule) > len(pool):
        raise ConfigError(f"budget.schedule {schedule} buys {sum(schedule)} labels but the pool holds "
                          f"{len(pool)} images; shorten the schedule or use a larger pool")
    return pool, test, list(classes)


def check_embeddings_pool(cfg, pool, test) -> None:
    """An embeddings pool (bring your own features) is v0 itself: its test set must be embeddings
    too, and without a ``path`` column nothing may need its images.

    Raises:
        ConfigError: naming what needs images and the fix.
    """
    from asvp_ray.methods import METHODS

    if test is not None and getattr(test, "kind", "") != "embeddings":
        raise ConfigError(f"data.pool is embeddings but data.test is {test.kind}: the test set needs features from "
                          "the same model; give it as embeddings too (data.test.kind: embeddings, data.test.path) "
                          "or set data.test: null")
    if pool.has_paths:
        return
    method = METHODS.get(cfg.method)
    why = method.finetunes(cfg) or method.extracts(cfg)
    if why:
        raise ConfigError(f"data.pool is embeddings without a path column, but {why}, which needs the images; "
                          f"add a path column to {pool.path}, or use method: svpp")
    if cfg.final.training_method not in ("none", "auto"):
        raise ConfigError(f"final.training_method={cfg.final.training_method} fine-tunes on the images, but the "
                          f"embeddings pool {pool.path} has no path column; set final.training_method: none")


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


def check_config_matches(rd, cfg) -> None:
    """Refuse to resume ``rd`` with a config that differs from its ``config.yaml`` (other than
    :data:`RESUMABLE_CHANGES`)."""
    if rd.config_path.is_file():
        import yaml

        old = upgrade_legacy_config(yaml.safe_load(rd.config_path.read_text()) or {})
        try:  # keys added since the run began compare as their defaults
            old = load_config(raw=old).model_dump(mode="json")
        except ConfigError:
            pass
        from asvp_ray.core.redact import redact_obj

        # config.yaml holds URIs with credentials redacted: compare what was written
        diff = [k for k in config_differences(redact_obj(old), redact_obj(cfg.model_dump(mode="json")))
                if not k.startswith(RESUMABLE_CHANGES)]
        if diff:
            raise RunDirError(f"{rd.location} holds a run made with a different config (differs in: "
                              f"{', '.join(diff)}); resume it with the same config, or use a new --out")


def new_ledger(cfg, data: Optional[Dict[str, Any]] = None, before_round: Optional[int] = None) -> CostLedger:
    """The run's cost ledger at ``cfg.cost``'s prices: empty, or read from ``data`` (the summary's
    ``ledger``) without the entries of rounds from ``before_round`` on."""
    c = cfg.cost
    return CostLedger.from_json(data, c.per_label, c.per_cpu_hour, c.per_gpu_hour, before_round=before_round)


@dataclass
class CommittedState:
    """A run directory's committed state, as the driver takes it over on ``prepare``."""

    next_round: int
    final_done: bool
    open_round: Optional[Dict[str, Any]]  # human labellers: the round awaiting labels
    labeled: Dict[str, np.ndarray]  # id, label, round
    summary: Dict[str, Any]
    ledger: CostLedger
    history: Any  # the alignment monitor's History


def load_state(rd, cfg, versions, pool, test, classes: List[str]) -> CommittedState:
    """Open the feature version (``versions``: extracting v0 if needed) and read the committed
    state of the run directory ``rd``: round counters, labelled set, summary, ledger, history."""
    state = rd.read_state()
    next_round = int(state["next_round"]) if state else 0
    final_done = bool(state and state.get("final_done"))
    open_round = state.get("open_round") if state else None
    pending_v0 = versions.open(int(state["feature_version"]) if state else None)
    lab = rd.read_labeled()
    keep = lab["round"] < next_round
    if open_round is not None:  # labels imported for the round awaiting completion
        keep |= lab["round"] == open_round["round"]
    if not keep.all():
        log.warning("rolling back %d label(s) of round(s) %s that were not committed", int((~keep).sum()),
                    sorted(set(lab["round"][~keep].tolist())))
    labeled = {k: v[keep] for k, v in lab.items()}
    summary = rd.read_summary() or new_summary(cfg, pool, test, classes, versions)
    summary["rounds"] = [r for r in summary.get("rounds", []) if r["round"] < next_round]
    if not final_done:
        summary.pop("final", None)
    # entries of uncommitted work are dropped; a committed final model keeps its own
    ledger = new_ledger(cfg, summary.get("ledger"), before_round=None if final_done else next_round)
    ledger.add_labels(len(labeled["id"]))
    versions.charge_v0(ledger, pending_v0)
    return CommittedState(next_round=next_round, final_done=final_done, open_round=open_round, labeled=labeled,
                          summary=summary, ledger=ledger, history=rebuild_history(summary))


def new_summary(cfg, pool, test, classes: List[str], versions) -> Dict[str, Any]:
    """The summary of a run that has not committed anything yet."""
    return {
        "name": cfg.name, "method": cfg.method, "strategy": cfg.strategy, "seed": cfg.seed,
        "strategy_options": dict(cfg.strategy_options),
        "pool_size": len(pool), "test_size": len(test) if test is not None else 0,
        "num_classes": len(classes), "classes": classes, "schedule": list(cfg.budget.schedule),
        "backbone": cfg.backbone.name, "feature_versions": versions.describe(),
        "status": "running", "rounds": [],
    }


def rebuild_history(summary: Dict[str, Any]):
    """The alignment monitor's history from the committed round records."""
    from asvp_ray.alignment import History, RoundState

    h = History()
    for rec in summary.get("rounds", []):
        h.append(RoundState(round=rec["round"], n_labeled=rec["n_labeled"], scores=rec.get("alignment") or {},
                            refreshed=bool(rec.get("refreshed")),
                            refreshed_scores=rec.get("alignment_after_refresh")))
    return h
