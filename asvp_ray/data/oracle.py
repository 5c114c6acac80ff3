"""Oracles: who answers "what is the label of these ids?". Pluggable through ``ORACLES``."""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from asvp_ray.core.registry import Registry

ORACLES: Registry["Oracle"] = Registry("oracle")


class Oracle(ABC):
    """One method: the labels of the requested ids (labels are bought only through it)."""

    @abstractmethod
    def label(self, ids: np.ndarray) -> np.ndarray:
        """int64 labels (class indices) of ``ids``, same order."""


@ORACLES.register("simulated")
class SimulatedOracle(Oracle):
    """Reveals the pool source's ground-truth labels, and only for the ids asked about.

    The source's label array stays private to the oracle: strategies and the proxy see labels
    only after they are bought.

    Args:
        source: a labelled ``PoolSource``.
    """

    def __init__(self, source):
        self._source = source
        self.bought = 0

    def label(self, ids: np.ndarray) -> np.ndarray:
        labels = self._source.label_of(np.asarray(ids, dtype=np.int64))
        self.bought += len(ids)
        return labels


@ORACLES.register("human")
def human_oracle(source=None) -> None:
    """Human labellers: no oracle object; labels arrive as files through ``asvp-ray label``
    (:mod:`asvp_ray.loop.human`), one round at a time (:mod:`asvp_ray.loop.human_round`)."""
    return None
