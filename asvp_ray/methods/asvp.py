"""ASVP (shared/ASVP.md): SVPP plus alignment monitoring after each round's labels, and a refresh
(fine-tune on the labelled set, re-extract the pool into a new feature version) when the
refresh policy says so. ``auto`` final training: FT after a refresh, else LP-FT."""
from __future__ import annotations

import logging
from typing import Any, Dict, Tuple

import numpy as np

from asvp_ray.core.errors import ConfigError
from asvp_ray.methods.base import METHODS, Method

log = logging.getLogger("asvp_ray.driver")


@METHODS.register("asvp")
class ASVP(Method):
    name = "asvp"
    _probe_result = None  # the probe's fine-tune of the round being decided

    @classmethod
    def finetunes(cls, cfg):
        if cfg.refresh.policy != "never":
            return f"method=asvp with refresh.policy={cfg.refresh.policy} can fine-tune"
        return None

    @classmethod
    def extracts(cls, cfg):
        if cfg.refresh.policy != "never":
            return f"method=asvp with refresh.policy={cfg.refresh.policy} re-extracts after a refresh"
        return None

    def refresh_policy(self):
        from asvp_ray.alignment import REFRESH_POLICIES

        cfg = self.ctx.cfg
        rc = cfg.refresh
        kwargs: Dict[str, Any] = {}
        if rc.policy == "at_labels":
            if not rc.at:
                raise ConfigError("refresh.policy: at_labels needs refresh.at, e.g. refresh.at: [1000, 5000]")
            kwargs = {"at": list(rc.at)}
        elif rc.policy == "score_drop":
            kwargs = {"score": rc.score, "threshold": rc.threshold, "min_new_labels": rc.min_new_labels,
                      "max_refreshes": rc.max_refreshes, "reference": rc.reference,
                      "reference_min_labels": rc.reference_min_labels}
        elif rc.policy == "probe":
            kwargs = {"score": rc.score, "margin": rc.margin, "max_refreshes": rc.max_refreshes}
        if rc.policy in ("score_drop", "probe") and rc.score not in cfg.monitor.scores:
            raise ConfigError(f"refresh.score {rc.score!r} is not computed by the monitor "
                              f"(monitor.scores = {cfg.monitor.scores}); add it there")
        return REFRESH_POLICIES.create(rc.policy, **kwargs)

    def after_labels(self, r: int, seconds: Dict[str, float], extra: Dict[str, Any]) -> bool:
        """Monitor alignment, ask the policy, and refresh the features when it says so."""
        from asvp_ray.alignment import RoundState

        ctx = self.ctx
        with ctx.timed(seconds, "monitor"):
            scores = self._monitor()
        ctx.history.append(RoundState(round=r, n_labeled=int(len(ctx.labeled["id"])), scores=scores))
        probe = self._probe_fn(seconds) if getattr(self.policy, "requires_probe", False) else None
        self._probe_result = None  # set by the probe: its fine-tune, reused by a refresh decided now
        decision = self.policy.decide(ctx.history, probe=probe)
        extra.update({"alignment": scores, "decision": decision.reason, "decision_scores": decision.scores,
                      "decision_reference": decision.reference})
        log.info("round %d alignment %s -> %s", r, scores, decision.reason)
        if not decision.refresh:
            ctx.history.mark_refreshed(False)
            return False
        extra["refresh"] = self._refresh(seconds, reuse=self._probe_result)
        with ctx.timed(seconds, "monitor"):
            after = self._monitor()
        extra["alignment_after_refresh"] = after
        ctx.history.mark_refreshed(True, refreshed_scores=after)
        return True

    def auto_final(self) -> Tuple[str, str]:
        refreshed = any(r.get("refreshed") for r in self.ctx.round_records())
        if refreshed:
            return "ft", "auto: features were refreshed, so FT (the labelled set is large enough to move them)"
        return "lpft", "auto: features were never refreshed, so LP-FT keeps the pre-trained information"

    # ------------------------------------------------------------------ helpers
    def _monitor(self) -> Dict[str, float]:
        """Alignment scores of the current features on the labelled set (seeded subsamples)."""
        ctx, versions = self.ctx, self.ctx.versions
        m = ctx.cfg.monitor
        rng = np.random.default_rng([ctx.cfg.seed, ctx.next_round, 2])
        take = np.arange(len(ctx.labeled["id"]))
        if len(take) > m.max_rows:
            take = np.sort(rng.choice(take, m.max_rows, replace=False))
        rows = versions.rows(ctx.labeled["id"][take])
        labels = ctx.labeled["label"][take]
        n = len(versions.ids)
        ref_rows = np.sort(rng.choice(n, m.reference_rows, replace=False)) if n > m.reference_rows else np.arange(n)
        shards = versions.shards
        if shards is not None:  # computed in a task that reads the rows from the shard actors
            from asvp_ray.pool.store_shards import compute_on_rows

            scores = compute_on_rows(shards, [rows, ref_rows], _scores, labels, tuple(m.scores))
        else:
            scores = _scores(versions.features_at(rows), versions.features_at(ref_rows), labels, tuple(m.scores))
        return {k: round(float(v), 6) for k, v in scores.items()}

    def _refresh(self, seconds: Dict[str, float], reuse=None) -> Dict[str, Any]:
        """Fine-tune on the labelled set, re-extract pool and test into v{k+1}, switch to it.

        Args:
            reuse: a FinetuneResult of the same recipe on the same labelled set (the probe's):
                its checkpoint is used and no second fine-tune runs.
        """
        ctx, versions = self.ctx, self.ctx.versions
        new_v = versions.current + 1
        res_t = ctx.train_resources()
        out: Dict[str, Any] = {"version": new_v}
        if reuse is not None:
            res = reuse
            seconds["refresh_finetune"] = 0.0
            ctx.ledger.add("refresh_finetune", 0.0, round=ctx.next_round, reused=str(res.checkpoint))
            out["finetune_reused"] = str(res.checkpoint)
            log.info("refresh v%d reuses the probe's fine-tuned checkpoint %s (no second fine-tune)", new_v,
                     res.checkpoint)
        else:
            with ctx.timed(seconds, "refresh_finetune", **res_t):
                res = ctx.finetune("ft", f"refresh-v{new_v}", evaluate=False)
        ft_cost = {"wall_s": round(float(getattr(res, "seconds", 0.0) or 0.0), 3), **res_t,
                   "checkpoint": str(res.checkpoint)}
        with ctx.timed(seconds, "refresh_extract", **versions.extract_resources()):
            versions.extract(new_v, checkpoint=res.checkpoint, phase="refresh_extract", finetune_cost=ft_cost)
        versions.switch_to(new_v)
        out.update({"checkpoint": str(res.checkpoint), "finetune_seconds": seconds["refresh_finetune"],
                    "extract_seconds": seconds["refresh_extract"]})
        return out

    def _probe_fn(self, seconds: Dict[str, float]):
        """For the probe policy: a cheap fine-tune, features of the labelled set only, their scores."""
        ctx = self.ctx

        def probe(history) -> Dict[str, float]:
            from asvp_ray.alignment import alignment_scores

            with ctx.timed(seconds, "probe", **ctx.train_resources()):
                # the refresh recipe on the same labelled set: a refresh decided now reuses it
                res = ctx.finetune("ft", f"probe-r{ctx.next_round}", evaluate=False)
                self._probe_result = res
                ids, feats = ctx.embed_labeled(res.checkpoint)
            order = np.argsort(ids)
            lab_order = np.argsort(ctx.labeled["id"])
            return alignment_scores(feats[order], ctx.labeled["label"][lab_order],
                                    reference=None, scores=tuple(ctx.cfg.monitor.scores))

        return probe


def _scores(feats: np.ndarray, ref: np.ndarray, labels: np.ndarray, scores: Tuple[str, ...]) -> Dict[str, float]:
    from asvp_ray.alignment import alignment_scores

    return alignment_scores(feats, labels, reference=ref, scores=scores)
