"""What a method sees of the run: the :class:`RoundContext` it is built with.

A method (:class:`~asvp_ray.methods.base.Method`) uses only these members, never the driver's
other attributes; the driver (:class:`asvp_ray.loop.driver.Driver`) implements them, and a test
can hand a method a small fake instead (tests/test_method_context.py: no Ray). Everything that
starts Ray work (fine-tunes, scoring or embedding with a fine-tuned model, extracting a feature
version) is behind a member here, so a method module imports no Ray itself except for work on the
pool's shard actors (``versions.shards``, None when the pool is in the driver).

Logging: methods log to the ``asvp_ray.driver`` logger like the driver, so their lines go to the
console and the run's ``run.log``.
"""
from __future__ import annotations

from typing import Any, ContextManager, Dict, List, Optional, Protocol, Tuple, runtime_checkable

import numpy as np


class FinetuneOutcome(Protocol):
    """What a fine-tune returned (``asvp_ray.train.finetune.FinetuneResult``): the members methods read."""

    checkpoint: Any  # the model file: a path or a URI
    test_accuracy: Optional[float]  # on the test set, when the fine-tune evaluated
    seconds: float  # wall seconds of the whole fine-tune


class FeatureVersionsView(Protocol):
    """The run's feature versions (``asvp_ray.loop.versions.FeatureVersions``): the members methods use."""

    current: int  # the current feature version
    ids: np.ndarray  # sorted pool ids, in feature-row order
    shards: Any  # the pool's shard actors (``StoreShards``), or None when its features are in the driver

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Feature rows of pool ``ids``."""

    def features_at(self, rows: np.ndarray) -> np.ndarray:
        """The current features of those rows (the pool in the driver only)."""

    def extract_resources(self) -> Dict[str, float]:
        """CPUs and GPUs an extraction holds (for the cost ledger)."""

    def extract(self, version: int, *, checkpoint: Any, phase: str, finetune_cost: Dict[str, Any]) -> None:
        """Extract pool and test set with the model file ``checkpoint`` into feature version ``version``."""

    def switch_to(self, version: int) -> None:
        """Make ``version`` the current feature version."""


class CostSink(Protocol):
    """The run's cost ledger (``asvp_ray.loop.ledger.CostLedger``): methods add entries only."""

    def add(self, phase: str, wall_s: float, cpus: float = 1.0, gpus: float = 0.0,
            round: Optional[int] = None, **info: Any) -> None:
        """Record one phase execution (``info``: stored with the entry)."""


@runtime_checkable
class RoundContext(Protocol):
    """The run as a method sees it during a round.

    Attributes:
        cfg: the run's validated config (``asvp_ray.config.Config``; methods read ``seed``,
            ``refresh``, ``monitor``).
        next_round: the round being run (0-based).
        labeled: the labelled set so far: ``{"id", "label", "round"}`` int64 arrays, labels of the
            round being run included once they arrived.
        versions: the feature versions (:class:`FeatureVersionsView`).
        history: the alignment monitor's history (``asvp_ray.alignment.History``), rebuilt from
            the committed rounds on resume; ASVP appends to it.
        ledger: the cost ledger (:class:`CostSink`), for work that :meth:`timed` does not time.
    """

    cfg: Any
    next_round: int
    labeled: Dict[str, np.ndarray]
    versions: FeatureVersionsView
    history: Any
    ledger: CostSink

    def round_records(self) -> List[Dict[str, Any]]:
        """The committed rounds' records (``summary.json``'s ``rounds``), oldest first."""

    def timed(self, seconds: Dict[str, float], phase: str, cpus: float = 1.0, gpus: float = 0.0,
              ledger_phase: Optional[str] = None) -> ContextManager[None]:
        """Time a phase: its wall seconds are added to ``seconds[phase]`` (the round's record) and
        charged to the ledger (as ``ledger_phase`` if given) holding ``cpus`` / ``gpus``."""

    def train_resources(self) -> Dict[str, float]:
        """``{"cpus", "gpus"}`` a fine-tune holds (pass them to :meth:`timed`)."""

    def finetune(self, method: str, tag: str, evaluate: bool) -> FinetuneOutcome:
        """Fine-tune the backbone on the labelled set with Ray Train (``method``: ft, lpft or
        linear_probe; ``tag`` names its checkpoint folder; ``evaluate``: on the test set, if the
        run has one)."""

    def predict_pool(self, checkpoint: Any) -> Tuple[np.ndarray, np.ndarray]:
        """``(ids, class probabilities)`` of the whole pool from the fine-tuned model file
        ``checkpoint`` (backbone + head), ids in the order they came back."""

    def embed_labeled(self, checkpoint: Any) -> Tuple[np.ndarray, np.ndarray]:
        """``(ids, features)`` of the labelled images from the fine-tuned model file ``checkpoint``,
        ids in the order they came back."""

