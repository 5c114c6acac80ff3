"""What one trial of a study needs from the cluster, and how many trials can run at once.

A trial is an asvp-ray run inside a Tune trial actor. Besides that actor (the run's driver:
proxy training, selection, the alignment monitor) it starts nested Ray work in phases, one at a
time: a Ray Train worker group (refresh fine-tunes, standard AL's per-round fine-tunes, the final
model; the fine-tune first reads its labelled images with Ray Data tasks, one CPU at least, and
the group starts once they are in the object store, so the two never hold CPUs together) and a
Ray Data extraction actor pool (re-extraction after a refresh, standard AL's pool
scoring, features v0 when the study could not extract them up front).

Why not one placement group per trial holding all of it: Ray Train v2 (the default in Ray 2.60,
``RAY_TRAIN_V2_ENABLED`` unset) always reserves a new placement group for its worker group
(``WorkerGroup._create_placement_group``; ``ScalingConfig`` has no way to hand it the caller's
group), and Ray Data schedules its tasks and actors ``SPREAD``, outside the trial's group. So the
study follows Ray Train's own guide for Train inside Tune ("set max_concurrent_trials to limit
the number of Ray Train driver processes ... calculated from the limiting cluster resource"):
each trial reserves only its driver through ``tune.with_resources``, and the study admits at
most N trials at once, where N trials' peak needs (driver + the largest nested phase) fit in the
cluster together. A running trial therefore always finds its nested resources free (when no other
job holds them); the trials beyond N wait PENDING. Inside a trial, the extraction actor pool is
sized to the trial's share, not to the whole cluster (``extract_plan.BUDGET_ENV``). The
cluster's capacity and the CPU/GPU arithmetic come from :mod:`asvp_ray.runtime.resources`.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from asvp_ray.config import Config
from asvp_ray.core.errors import ConfigError
from asvp_ray.runtime.resources import (EPS, RESOURCES, add_cpu_gpu, cpu_gpu_capacity, fits, format_cpu_gpu,
                                        max_cpu_gpu)


def _method(cfg: Config):
    from asvp_ray.methods import METHODS

    return METHODS.get(cfg.method)


def trains(cfg: Config) -> Optional[str]:
    """Why a run starts Ray Train workers (None when it never does)."""
    why = [w for w in (_method(cfg).finetunes(cfg),) if w]
    if cfg.final.training_method != "none":
        why.append(f"final.training_method={cfg.final.training_method} trains a final model")
    return "; ".join(why) or None


def extracts(cfg: Config, prefetched: bool) -> Optional[str]:
    """Why a run starts an extraction actor pool inside its trial (None when it never does)."""
    why = [w for w in (_method(cfg).extracts(cfg),) if w]
    if not prefetched:
        why.append("features v0 are extracted by each trial (a continuous data.*/backbone.* key)")
    return "; ".join(why) or None


@dataclass(frozen=True)
class TrialNeed:
    """One trial's resources.

    Attributes:
        head: the trial actor itself (``--cpus-per-trial``, ``--gpus-per-trial``).
        train: its Ray Train worker group (zero when it never fine-tunes). The fine-tune's image
            reading (Ray Data tasks, 1 CPU at least) finishes before the group starts, so the
            phase needs the larger of the two: at least 1 CPU.
        extract: its extraction actor pool plus one CPU for the read tasks (zero when it never extracts).
        extract_budget: what the extraction inside the trial is sized to (``extract_plan.plan_actors``).
        why_train, why_extract: the settings that make it fine-tune / extract.
    """

    head: Dict[str, float]
    train: Dict[str, float]
    extract: Dict[str, float]
    extract_budget: Dict[str, float]
    why_train: Optional[str] = None
    why_extract: Optional[str] = None
    detail: Dict[str, str] = field(default_factory=dict)

    @property
    def peak(self) -> Dict[str, float]:
        """The most the trial holds at once: its actor plus the larger nested phase (phases run one at a time)."""
        return add_cpu_gpu(self.head, max_cpu_gpu(self.train, self.extract))


def trial_need(cfg: Config, capacity: Dict[str, float], head: Dict[str, float], share: Dict[str, float],
               prefetched: bool) -> TrialNeed:
    """One trial's need when it may use ``share`` of the cluster.

    Raises:
        ConfigError: the trial's Ray Train or extraction settings do not fit ``capacity``/``share``.
    """
    from asvp_ray.features.extract_plan import plan_actors

    train = {r: 0.0 for r in RESOURCES}
    detail: Dict[str, str] = {}
    why_t = trains(cfg)
    if why_t:
        plan = cfg.train.plan(capacity)
        per = plan.resources_per_worker
        train = {r: plan.num_workers * float(per.get(r, 0.0)) for r in RESOURCES}
        train["CPU"] = max(train["CPU"], 1.0)  # its Ray Data read tasks, before the workers start
        detail["train"] = (f"train.num_workers={plan.num_workers} x train.cpus_per_worker={per.get('CPU', 0):g}"
                           + (" and 1 GPU (train.use_gpu)" if plan.use_gpu else ""))
    extract = {r: 0.0 for r in RESOURCES}
    budget = {r: max(share.get(r, 0.0) - head.get(r, 0.0), 0.0) for r in RESOURCES}
    why_e = extracts(cfg, prefetched)
    if why_e:
        ap = plan_actors(cfg.extract, budget)
        extract = {"CPU": ap.num_actors * ap.num_cpus + 1.0, "GPU": ap.num_actors * ap.num_gpus}
        detail["extract"] = (f"{ap.num_actors} extraction actor(s) x {ap.num_cpus:g} CPU"
                             + (f" + {ap.num_gpus:g} GPU" if ap.num_gpus else "") + " + 1 CPU for reading images "
                             "(extract.num_actors, extract.num_cpus_per_actor, extract.num_gpus_per_actor)")
    return TrialNeed(head=dict(head), train=train, extract=extract, extract_budget=budget, why_train=why_t,
                     why_extract=why_e, detail=detail)


def resource_variants(base_raw: Dict[str, Any], space, limit: int = 64) -> List[Dict[str, Any]]:
    """Raw configs covering the searched keys that change a trial's resources (method, train.*,
    extract.*, refresh.*, final.*): every grid/choice value and both ends of a range."""
    from asvp_ray.tune.space import set_key

    keys = ("method", "train", "extract", "refresh", "final")
    params = [p for p in space.params if p.key.split(".")[0] in keys]
    combos = list(itertools.islice(itertools.product(*[p.samples() for p in params]), limit)) if params else [()]
    out = []
    for vals in combos:
        raw = json.loads(json.dumps(base_raw))
        for p, v in zip(params, vals):
            raw = set_key(raw, p.key, v)
        out.append(raw)
    return out


@dataclass(frozen=True)
class StudyPlan:
    """How a study uses the cluster.

    Attributes:
        max_concurrent: trials running at once.
        need: the largest trial's need (per resource, over the searched values).
        capacity: the cluster's resources.
        extract_budget: what each trial's extraction is sized to.
    """

    max_concurrent: int
    need: TrialNeed
    capacity: Dict[str, float]
    autoscaling: bool
    extract_budget: Dict[str, float]

    def describe(self) -> str:
        n = self.need
        parts = [f"trial actor {format_cpu_gpu(n.head)}"]
        if n.why_train:
            parts.append(f"Ray Train {format_cpu_gpu(n.train)}")
        if n.why_extract:
            parts.append(f"extraction {format_cpu_gpu(n.extract)}")
        return (f"each trial needs at most {format_cpu_gpu(n.peak)} ({'; '.join(parts)}; nested phases run one at "
                f"a time); the cluster has {format_cpu_gpu(self.capacity)}: {self.max_concurrent} trial(s) at once")


def _shrink_hint(need: TrialNeed, resource: str) -> str:
    hints = []
    if need.train.get(resource, 0) > 0:
        hints.append("train.num_workers" + (", train.cpus_per_worker" if resource == "CPU" else ", train.use_gpu: false"))
        if "final.training_method" in (need.why_train or ""):
            hints.append("final.training_method=none (no final model)")
    if need.extract.get(resource, 0) > 0:
        hints.append("extract.num_actors / extract.num_cpus_per_actor" if resource == "CPU"
                     else "extract.device: cpu or extract.num_gpus_per_actor")
    if "refresh" in (need.why_train or "") + (need.why_extract or ""):
        hints.append("refresh.policy=never")
    if need.head.get(resource, 0) > 0:
        hints.append("--cpus-per-trial" if resource == "CPU" else "--gpus-per-trial")
    return ", ".join(dict.fromkeys(hints))


def plan_study(cfgs: Sequence[Config], n_trials: int, *, head: Dict[str, float], prefetched: bool,
               max_concurrent: Optional[int] = None, capacity: Optional[Dict[str, float]] = None,
               autoscaling: bool = False) -> StudyPlan:
    """The concurrency of a study whose trials run ``cfgs`` (their resource variants).

    Picks the largest N (at most ``n_trials``, at most ``max_concurrent``) for which N trials, each
    with its extraction sized to 1/N of the cluster, fit at their peak together.

    Raises:
        ConfigError: not even one trial fits the cluster (names the resource, the amount one trial
            needs, the amount the cluster has, and the settings that shrink it).
    """
    if capacity is None:
        capacity, autoscaling = cpu_gpu_capacity()
    top = max(1, n_trials if max_concurrent is None else min(n_trials, max_concurrent))
    for n in range(top, 0, -1):
        share = {r: capacity[r] / n for r in RESOURCES}
        try:
            needs = [trial_need(c, capacity, head, share, prefetched) for c in cfgs]
        except ConfigError as e:
            if n == 1:
                raise ConfigError(f"one trial does not fit the cluster ({format_cpu_gpu(capacity)}) next to its trial "
                                  f"actor ({format_cpu_gpu(head)}, --cpus-per-trial/--gpus-per-trial): {e}") from None
            continue
        peak = {r: max(x.peak[r] for x in needs) for r in RESOURCES}
        if fits({r: n * peak[r] for r in RESOURCES}, capacity):
            worst = max(needs, key=lambda x: sum(x.peak[r] / max(capacity[r], EPS) for r in RESOURCES))
            return StudyPlan(n, worst, capacity, autoscaling, worst.extract_budget)
        if n == 1:
            worst = max(needs, key=lambda x: max(x.peak[r] - capacity[r] for r in RESOURCES))
            r = max(RESOURCES, key=lambda r: worst.peak[r] - capacity[r])
            nested = []
            if worst.train.get(r, 0) > 0:
                nested.append(f"Ray Train {worst.train[r]:g} ({worst.detail['train']}; because {worst.why_train})")
            if worst.extract.get(r, 0) > 0:
                nested.append(f"extraction {worst.extract[r]:g} ({worst.detail['extract']}; because "
                              f"{worst.why_extract})")
            flag = "--cpus-per-trial" if r == "CPU" else "--gpus-per-trial"
            raise ConfigError(
                f"one trial needs {worst.peak[r]:g} {r} but the cluster has {capacity[r]:g} {r}"
                + ("" if autoscaling else " and no autoscaler to add more")
                + f", so no trial could ever finish: the trial actor {worst.head.get(r, 0):g} ({flag})"
                + (" plus its largest nested phase, " + " or ".join(nested) if nested else "")
                + f". Shrink it with {_shrink_hint(worst, r)} (in the config, --set or the space), or add {r}s")
    raise AssertionError("unreachable")  # pragma: no cover


def head_resources(cpus_per_trial: float, gpus_per_trial: float) -> Dict[str, float]:
    return {"CPU": float(cpus_per_trial), "GPU": float(gpus_per_trial)}


def placement_group_factory(head: Dict[str, float]):
    """The trial actor's reservation for ``tune.with_resources``."""
    from ray.tune import PlacementGroupFactory

    bundle = {k: v for k, v in head.items() if v > 0}
    return PlacementGroupFactory([bundle])

