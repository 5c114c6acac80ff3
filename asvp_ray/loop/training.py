"""Fine-tuning from the driver with Ray Train: the labelled set's fine-tunes (feature refresh,
standard AL, probes), what a fine-tuned model computes for a method (the pool's class
probabilities, the labelled images' features), and the final model trained after the last round.

The functions take the driver ``d`` and use only its public members."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from asvp_ray.storage.locations import is_uri, join_uri
from asvp_ray.core.redact import redact_uri

log = logging.getLogger("asvp_ray.driver")


def train_resources(train_cfg) -> Dict[str, float]:
    """CPUs and GPUs a fine-tune holds (for the cost ledger)."""
    plan = train_cfg.plan()
    return {"cpus": plan.num_workers * plan.resources_per_worker.get("CPU", 0.0),
            "gpus": plan.num_workers * plan.resources_per_worker.get("GPU", 0.0)}


def _checkpoint_folder(root, tag: str):
    return join_uri(root, tag) if is_uri(root) else Path(root) / tag


def finetune_labeled(d, method: str, tag: str, evaluate: bool):
    """Fine-tune the backbone on the driver's labelled set with Ray Train; returns the FinetuneResult.

    The model file and Ray Train's checkpoints go to ``rd.checkpoints/<tag>``: ``DIR/checkpoints``,
    or with ``storage`` set the run's ``checkpoints`` folder there (a local folder or a URI). The
    folder name depends on the tag only, so a fine-tune rerun after a crash finds its checkpoints.
    """
    from asvp_ray.train.finetune import finetune

    d.versions.release_shards()  # pool shard actors give their CPUs to the Train workers
    kwargs: Dict[str, Any] = {}
    if evaluate and d.test is not None:
        kwargs = dict(eval_source=d.test, eval_ids=d.test.ids, eval_labels=d.test.labels)
    res = finetune(d.pool, d.labeled["id"], d.labeled["label"], len(d.classes), d.spec,
                   d.cfg.train, _checkpoint_folder(d.rd.checkpoints, tag), method=method, **kwargs)
    log.info("fine-tune %s (%s) on %d labels: %.1fs, checkpoint %s, test accuracy %s", tag, method,
             len(d.labeled["id"]), res.seconds, redact_uri(res.checkpoint), res.test_accuracy)
    return res


def predict_pool(d, checkpoint) -> Tuple[np.ndarray, np.ndarray]:
    """``(ids, class probabilities)`` of the driver's whole pool from the model file ``checkpoint``
    (backbone + head), through the extraction actor pool; ids in the order they came back."""
    from asvp_ray.features.extract import predict_proba

    return predict_proba(d.pool, d.ids, checkpoint, d.spec, d.cfg.extract)


def embed_labeled(d, checkpoint) -> Tuple[np.ndarray, np.ndarray]:
    """``(ids, features)`` of the driver's labelled images from the model file ``checkpoint``,
    through the extraction actor pool; ids in the order they came back."""
    from asvp_ray.features.extract import extract

    chunks = list(extract(d.pool, d.spec, d.cfg.extract, ids=d.labeled["id"], checkpoint=checkpoint))
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


def final_method(cfg, method, pool=None) -> Tuple[str, str]:
    """``(final training method, why)``, following ASVP.md (``auto``: ``method.auto_final()``;
    none for an embeddings pool without images)."""
    m = cfg.final.training_method
    if m != "auto":
        return m, f"final.training_method={m} (configured)"
    if pool is not None and getattr(pool, "kind", "") == "embeddings" and not pool.has_paths:
        return "none", "auto: the embeddings pool has no images (no path column) to train a model on"
    return method.auto_final()


def run_final(d) -> Optional[Dict[str, Any]]:
    """Train the final model on the driver's final labelled set, evaluate it on the test set, commit."""
    method, reason = final_method(d.cfg, d.method, d.pool)
    if method == "none" or d.final_done:
        return d.summary.get("final")
    seconds: Dict[str, float] = {}
    with d.timed(seconds, "final_train", **d.train_resources()):
        res = d.finetune(method, "final", evaluate=True)
    d.summary["final"] = {"training_method": method, "reason": reason,
                          "test_accuracy": res.test_accuracy, "checkpoint": redact_uri(res.checkpoint),
                          "seconds": round(seconds["final_train"], 3), "n_labeled": int(len(d.labeled["id"]))}
    d.final_done = True
    d.commit()
    log.info("final model (%s: %s): test accuracy %s", method, reason, res.test_accuracy)
    return d.summary["final"]
