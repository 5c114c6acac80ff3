"""A round's own computations, for the driver (:mod:`asvp_ray.loop.driver`): this round's proxy
(seeded by the round), training it where the labelled rows are, the labelled mask of the pool
view, and the round's record."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from asvp_ray.proxy.mlp import MLPProxy


def proxy_for_round(cfg, r: int) -> MLPProxy:
    """An untrained proxy for round ``r`` as ``cfg.proxy`` configures it, seeded by ``[seed, r, 1]``."""
    p = cfg.proxy
    return MLPProxy(hidden=p.hidden, linear=p.linear, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
                    momentum=p.momentum, weight_decay=p.weight_decay, normalize=p.normalize, device=p.device,
                    seed=int(np.random.default_rng([cfg.seed, r, 1]).integers(2**31)))


def _fit_proxy(X: np.ndarray, proxy: MLPProxy, labels: np.ndarray, num_classes: int):
    """``(the proxy fitted on X, its accuracy on X)`` (run where the rows are)."""
    proxy.fit(X, labels, num_classes=num_classes)
    return proxy, proxy.score(X, labels)


def train_proxy(proxy: MLPProxy, versions, labeled: Dict[str, np.ndarray], num_classes: int) -> Tuple[MLPProxy, float]:
    """Fit ``proxy`` on the labelled rows of the current feature version; returns ``(proxy, its
    training accuracy)``. With the pool in shard actors and the proxy on the CPU, it trains in a
    Ray task that reads the labelled rows from the shards (the rows and the training's working
    memory never enter the driver; the fitted proxy comes back), on the driver's thread count:
    the same proxy."""
    from asvp_ray.proxy.mlp import _resolve_device

    labels = labeled["label"]
    shards = versions.shards
    if shards is not None and len(labels) and _resolve_device(proxy.device).type == "cpu":
        from asvp_ray.pool.store_shards import compute_on_rows

        return compute_on_rows(shards, [versions.rows(labeled["id"])], _fit_proxy, proxy, labels, num_classes)
    X = versions.features_of(labeled["id"])
    proxy = proxy.fit(X, labels, num_classes=num_classes)
    return proxy, proxy.score(X, labels)


def labeled_mask(ids: np.ndarray, labeled_ids: np.ndarray) -> np.ndarray:
    """Which of the sorted pool ``ids`` are labelled (a bool mask over them)."""
    # ids is sorted: look the labelled ids up (np.isin sorts a copy of both: ~30 MB at 1M rows)
    mask = np.zeros(len(ids), dtype=bool)
    if len(labeled_ids) and len(ids):
        pos = np.minimum(np.searchsorted(ids, labeled_ids), len(ids) - 1)
        mask[pos[ids[pos] == labeled_ids]] = True
    return mask


def round_record(batch: Dict[str, Any], labeled: Dict[str, np.ndarray], feature_version: int, refreshed: bool,
                 train_acc: float, test_acc: Optional[float], seconds: Dict[str, float],
                 extra: Dict[str, Any]) -> Dict[str, Any]:
    """The record of round ``batch["round"]`` for ``summary.json``'s ``rounds``."""
    r = batch["round"]
    return {
        "round": r, "n_labeled": int(len(labeled["id"])), "n_selected": int(len(batch["ids"])),
        "n_labels_bought": int((labeled["round"] == r).sum()), "selected_by": batch["selected_by"],
        "feature_version": feature_version, "refreshed": refreshed,
        "proxy_train_accuracy": round(float(train_acc), 6),
        "proxy_test_accuracy": None if test_acc is None else round(test_acc, 6),
        "seconds": seconds, **extra,
    }
