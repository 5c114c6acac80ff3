"""Standard AL: each round fine-tunes the backbone on the labelled set and scores the whole pool
with backbone + head (no proxy scoring); FT final model."""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from asvp_ray.core.errors import RunDirError
from asvp_ray.methods.base import METHODS, Method


@METHODS.register("standard")
class Standard(Method):
    name = "standard"

    @classmethod
    def finetunes(cls, cfg):
        return "method=standard fine-tunes every round"

    @classmethod
    def extracts(cls, cfg):
        return "method=standard scores the pool with each fine-tuned model"

    def pool_probs(self, seconds: Dict[str, float], extra: Dict[str, Any]) -> Optional[np.ndarray]:
        """Fine-tune on the labelled set, then score the whole pool with backbone + head."""
        ctx = self.ctx
        r = ctx.next_round
        with ctx.timed(seconds, "finetune", **ctx.train_resources()):
            res = ctx.finetune("ft", f"round-{r}", evaluate=True)  # on the test set, if the run has one
        with ctx.timed(seconds, "score_pool", **ctx.versions.extract_resources()):
            ids, probs = ctx.predict_pool(res.checkpoint)
        order = np.argsort(ids)
        if not np.array_equal(ids[order], ctx.versions.ids):
            raise RunDirError("standard AL scoring returned ids that do not match the feature store's pool")
        extra.update({"finetune_test_accuracy": res.test_accuracy, "checkpoint": str(res.checkpoint)})
        return probs[order]
