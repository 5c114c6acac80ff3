"""What an active-learning method is to the driver: a small class with the hooks it calls.

The driver (:mod:`asvp_ray.loop.driver`) keeps the round loop, the commit point and the cost
ledger; a method sees the run only through the :class:`~asvp_ray.methods.context.RoundContext` it
is built with (the driver implements it; tests pass a fake) and decides only:

- :meth:`Method.refresh_policy`: the feature-refresh policy (``never`` unless the method refreshes);
- :meth:`Method.pool_probs`: where the pool's class probabilities come from this round (None: the
  proxy scores the current features);
- :meth:`Method.after_labels`: what happens once a round's labels arrived, before the proxy is
  trained (ASVP: monitor alignment, maybe refresh the features);
- :meth:`Method.auto_final`: which final training method ``final.training_method: auto`` means.

Add a method: a new module in this package with a ``@METHODS.register("name")`` class, imported in
``asvp_ray/methods/__init__.py``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from asvp_ray.core.registry import Registry
from asvp_ray.methods.context import RoundContext

METHODS: Registry["Method"] = Registry("method")


class Method:
    """Base class: the SVPP behaviour (fixed features, proxy-scored pool, FT final model).

    Args:
        ctx: the run as the method sees it (timing, fine-tunes, the feature versions, the
            labelled set, the config ...); hooks use only its members.

    Attributes:
        policy: the run's feature-refresh policy (:meth:`refresh_policy`, built here so that a
            bad ``refresh`` section fails when the method is created).
    """

    name = "method"

    def __init__(self, ctx: RoundContext):
        self.ctx = ctx
        self.policy = self.refresh_policy()

    def refresh_policy(self):
        """The feature-refresh policy of the run (default: never refresh)."""
        from asvp_ray.alignment import REFRESH_POLICIES

        return REFRESH_POLICIES.create("never")

    def pool_probs(self, seconds: Dict[str, float], extra: Dict[str, Any]) -> Optional[np.ndarray]:
        """Class probabilities (N, C) of the pool rows for this round's selection, or None for
        the proxy's. Called before every selection but the cold start; may add timed phases to
        ``seconds`` and fields to the round's record (``extra``)."""
        return None

    def after_labels(self, r: int, seconds: Dict[str, float], extra: Dict[str, Any]) -> bool:
        """Work done once round ``r``'s labels are in, before the proxy trains. Returns whether
        the features were refreshed (the driver prunes old versions after the commit)."""
        return False

    # What a run of this method may start besides the driver, read by Tune's resource plan
    # (asvp_ray/tune/resources.py): a reason string, or None when it never does. A method that
    # does not say is counted as doing both, so a study never under-reserves for it.
    @classmethod
    def finetunes(cls, cfg) -> Optional[str]:
        """Why a run of this method fine-tunes (Ray Train workers) before its final model."""
        return f"method={cls.name} may fine-tune (it does not say otherwise)"

    @classmethod
    def extracts(cls, cfg) -> Optional[str]:
        """Why a run of this method starts an extraction actor pool after features v0."""
        return f"method={cls.name} may extract (it does not say otherwise)"

    def auto_final(self) -> Tuple[str, str]:
        """``(training method, reason)`` meant by ``final.training_method: auto``."""
        return "ft", f"auto: {self.name} trains the final model with FT"
