"""Planning a feature extraction: where it computes and how large its actor pool is.

Device and precision: ``plan_actors`` decides CPU or GPU actors from the cluster's resources;
on GPU actors ``extract.amp`` is resolved to bf16/fp16/fp32 from the compute capability of a GPU
of the cluster (``resolve_compute``, a one-off probe task that reserves a GPU) and every actor
checks that its own card agrees. Both are recorded in meta.json and name the feature cache
entry.

Resource sizing (``plan_actors``): the pool autoscales between ``extract.min_actors`` (default 1)
and ``extract.max_actors`` (default: what the cluster holds when the extraction starts). On a
small machine an actor pool that takes every CPU leaves none for the read and decode tasks
feeding it, and the job hangs: CPU actors therefore leave at least one CPU of the cluster free,
and a minimum that would take them all is refused with the fix. GPU actors (``extract.device:
cuda``) and ``extract.resources_per_actor`` that no alive node has are waited for
(``wait_for_actors``) by placing the demand an autoscaler adds nodes for, up to
``extract.resource_timeout_s``.

The cluster's capacity, the fit checks and the wait for nodes come from
:mod:`asvp_ray.runtime.resources`; the pipeline that runs the plan is :mod:`asvp_ray.features.extract`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from asvp_ray.core.errors import ConfigError
from asvp_ray.runtime.faults import gpu_on_cpu
from asvp_ray.runtime.resources import resource_timeout, wait_for_resources

log = logging.getLogger(__name__)

# Resources the extraction may use, as JSON ({"CPU": 1.5, "GPU": 0}), when the caller holds a share
# of the cluster (a Ray Tune trial of a study) instead of all of it; unset: the whole cluster.
BUDGET_ENV = "ASVP_RAY_EXTRACT_RESOURCES"


def _budget() -> Optional[Dict[str, float]]:
    raw = os.environ.get(BUDGET_ENV)
    if not raw:
        return None
    import json

    return {str(k): float(v) for k, v in json.loads(raw).items()}


@dataclass(frozen=True)
class Compute:
    """Where and how features are computed (recorded in meta.json, part of the cache key).

    Attributes:
        device: ``cpu`` or ``cuda``.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        amp: the configured ``extract.amp``.
        gpu: the probed card's name (None on CPU).
        capability: its compute capability ``[major, minor]`` (None on CPU).
    """

    device: str
    precision: str
    amp: str
    gpu: Optional[str] = None
    capability: Optional[Tuple[int, int]] = None

    def to_meta(self) -> Dict[str, Any]:
        return {"device": self.device, "precision": self.precision, "amp": self.amp, "gpu": self.gpu,
                "capability": list(self.capability) if self.capability else None}


def _probe_gpu() -> Dict[str, Any]:
    """Runs in a task that reserves a GPU: the card's name and compute capability."""
    from asvp_ray.runtime.device import cuda_facts

    return cuda_facts()


def resolve_compute(cfg, plan: Optional["ActorPlan"] = None) -> Compute:
    """The device and precision an extraction with ``cfg`` will use on this cluster.

    On GPU actors the precision depends on the card, so a small task reserving a GPU (like the
    actors will) reads its compute capability first; CPU extraction is always float32.

    A GPU plan first waits for the cluster to hold its actors (``wait_for_actors``: an
    autoscaler adds a GPU node for the demand).

    Raises:
        ConfigError: ``extract.amp: bf16`` on a card older than compute capability 8.0, no GPU
            node within ``extract.resource_timeout_s``, or the ``plan_actors`` errors.
    """
    from asvp_ray.runtime.device import choose_precision

    plan = plan or plan_actors(cfg)
    if plan.device != "cuda":
        return Compute("cpu", choose_precision(cfg.amp, "cpu"), cfg.amp)
    wait_for_actors(cfg, plan)
    if gpu_on_cpu():  # a cluster rehearsal's fake GPU nodes: scheduled as GPU work, computed in fp32 on CPUs
        return Compute("cuda", "fp32", cfg.amp)
    if cfg.amp == "off":
        return Compute("cuda", "fp32", cfg.amp)
    import ray

    log.info("reading the compute capability of a cluster GPU to choose extract.amp=%s", cfg.amp)
    probe = ray.remote(_probe_gpu).options(num_cpus=0, num_gpus=plan.num_gpus, **(
        {"resources": plan.resources} if plan.resources else {}))
    facts = ray.get(probe.remote())
    cap = tuple(facts["capability"])
    precision = choose_precision(cfg.amp, "cuda", cap, facts["gpu"], key="extract.amp")
    log.info("extraction on %s (compute capability %d.%d): %s", facts["gpu"], cap[0], cap[1], precision)
    return Compute("cuda", precision, cfg.amp, facts["gpu"], cap)


@dataclass(frozen=True)
class ActorPlan:
    """How the extraction actor pool is sized.

    Attributes:
        min_actors: actors the pool starts with and keeps.
        max_actors: the most it grows to while batches wait (Ray Data's actor-pool autoscaling;
            actors the cluster cannot hold yet stay pending, which an autoscaler adds nodes for).
        num_cpus, num_gpus: what each actor reserves.
        torch_threads: intra-op threads per actor.
        device: ``cpu`` or ``cuda``.
        resources: custom resources each actor also reserves (``extract.resources_per_actor``).
        why: how the sizes were chosen, for the log.
    """

    min_actors: int
    max_actors: int
    num_cpus: float
    num_gpus: float
    torch_threads: int
    device: str
    resources: Dict[str, float] = field(default_factory=dict)
    why: str = ""

    @property
    def num_actors(self) -> int:
        """The most actors the pool holds at once (what it may reserve: the ledger, a Tune trial's share)."""
        return self.max_actors

    def actor_bundle(self) -> Dict[str, float]:
        """The resources one actor reserves."""
        return {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}


def _pool_size(cfg, fit: int, unit: str) -> Tuple[int, int, str]:
    """(min, max, why) from the config and ``fit``, the actors the cluster holds now (see ``plan_actors``)."""
    if cfg.num_actors is not None:
        return cfg.num_actors, cfg.num_actors, f"extract.num_actors={cfg.num_actors} (fixed size)"
    lo = cfg.min_actors or 1
    if cfg.max_actors is not None:
        hi, why = cfg.max_actors, f"max extract.max_actors={cfg.max_actors}"
    else:
        hi, why = max(fit, lo), f"max {max(fit, lo)}: {unit} (extract.max_actors grows it further)"
    if hi > fit:
        log.info("extract: up to %d actors but the cluster holds %d now; the rest start when nodes are added", hi, fit)
    return lo, hi, f"min {'extract.min_actors=' if cfg.min_actors else ''}{lo}, {why}"


def plan_actors(cfg, resources: Optional[Dict[str, float]] = None) -> ActorPlan:
    """Size the actor pool from the config and the cluster's resources.

    The pool autoscales between ``min_actors`` (default 1) and ``max_actors``. The default
    maximum is what the cluster holds when the extraction starts: its GPUs / ``num_gpus_per_actor``
    for GPU actors, its CPUs minus one (kept for the read and decode tasks) / ``num_cpus_per_actor``
    for CPU actors. Ray cannot see an autoscaler's node limit, so growing past the current size
    needs ``extract.max_actors``; actors beyond what the nodes hold stay pending until the
    autoscaler adds nodes (``extract.device: cuda`` with no GPU up yet plans one GPU actor and
    ``extract`` waits for the GPU node, see ``wait_for_resources``). ``extract.device: auto``
    chooses GPU actors when the cluster has GPUs now or its autoscaler can add them
    (``runtime.resources.cluster_capacity``); CPU actors on a cluster whose CPU nodes scaled to zero are
    sized for one node of its largest CPU type.

    Args:
        cfg: an ``ExtractConfig``.
        resources: cluster resources (default: ``$ASVP_RAY_EXTRACT_RESOURCES`` when set, e.g. by a
            study's trial, else ``ray.cluster_resources()``).

    Raises:
        ConfigError: the minimum pool would starve the read tasks of CPUs.
    """
    can: Dict[str, float] = {}
    if resources is None:
        resources = _budget()
        if resources is None:  # the live cluster: what is up now, and what its autoscaler can add
            from asvp_ray.runtime.resources import cluster_capacity, largest_cpu_node, resources_now

            resources = resources_now()
            can = cluster_capacity()[0]
            # CPU nodes scaled to zero: size the pool for one node of the largest CPU type (it waits for it)
            node_cpus = largest_cpu_node()
            if resources.get("CPU", 0) < node_cpus:
                log.info("extract: %g CPU up now; planning CPU actors for one %g-CPU node the autoscaler adds",
                         resources.get("CPU", 0), node_cpus)
                resources = dict(resources, CPU=node_cpus)
    cpus = float(resources.get("CPU", 1))
    gpus = float(resources.get("GPU", 0))
    custom = {str(k): float(v) for k, v in (getattr(cfg, "resources_per_actor", None) or {}).items()}
    # device auto: GPU actors when the cluster has GPUs or its autoscaler can add them
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and max(gpus, can.get("GPU", 0)) >= cfg.num_gpus_per_actor)
    if use_gpu:
        fit = int(gpus // cfg.num_gpus_per_actor)
        lo, hi, why = _pool_size(cfg, fit, f"the cluster's {gpus:g} GPU(s) now at {cfg.num_gpus_per_actor:g} per actor")
        # up to 1 CPU each, less where the minimum pool and a read task would not fit the CPUs
        # (2 GPU actors on a 2-CPU machine: 0.5 each, 1 left for the reads), never under 0.25
        num_cpus = min(1.0, max((cpus - 1) / max(lo, 1), 0.25))
        threads = cfg.torch_threads or 2
        return ActorPlan(lo, hi, num_cpus, float(cfg.num_gpus_per_actor), threads, "cuda", custom, why)
    free_for_actors = cpus - 1.0  # one CPU stays for the read/decode tasks
    fit = int(free_for_actors // cfg.num_cpus_per_actor) if free_for_actors >= cfg.num_cpus_per_actor else 0
    device_why = "" if cfg.device == "cpu" else f"; CPU actors: extract.device=auto and the cluster has {gpus:g} GPU(s)"
    if fit == 0:
        asked = max(cfg.num_actors or 0, cfg.min_actors or 0)
        if asked > 1 or cfg.num_cpus_per_actor > 1:
            raise ConfigError(
                f"extract.num_cpus_per_actor={cfg.num_cpus_per_actor:g} x {max(asked, 1)} actor(s) leaves no CPU for "
                f"reading images on this {cpus:g}-CPU cluster and the job would hang; set extract.num_cpus_per_actor "
                f"to at most {max(cpus - 1, 0.5):g} with one actor (extract.min_actors: 1)")
        # A cluster of less than 2 CPUs: the read tasks take 1 CPU each, the actor what is left (on a
        # 1-CPU cluster nothing: it computes on the CPU the read tasks leave idle while they wait for it).
        # Half a CPU on a 1-CPU cluster made actor + read task 1.5 CPU, a plan that never started.
        num_cpus = max(cpus - 1.0, 0.0)
        hi = cfg.max_actors or 1
        return ActorPlan(1, hi, num_cpus, 0.0, cfg.torch_threads or max(1, int(cpus)), "cpu", custom,
                         f"min 1, max {hi}: a {cpus:g}-CPU cluster, one actor of {num_cpus:g} CPU beside a 1-CPU "
                         f"read task{device_why}")
    lo, hi, why = _pool_size(cfg, fit, f"the cluster's {cpus:g} CPUs now, less 1 for reads, at "
                                       f"{cfg.num_cpus_per_actor:g} per actor")
    if lo > fit and not custom:
        key = "num_actors" if cfg.num_actors is not None else "min_actors"
        raise ConfigError(
            f"extract.{key}={lo} x num_cpus_per_actor={cfg.num_cpus_per_actor:g} takes every CPU of this "
            f"{cpus:g}-CPU cluster, which starves the read tasks and hangs; use extract.{key} <= {fit}, or "
            "extract.max_actors for a pool that grows when the cluster does")
    threads = cfg.torch_threads or max(1, int(cpus // hi))
    return ActorPlan(lo, hi, float(cfg.num_cpus_per_actor), 0.0, threads, "cpu", custom, why + device_why)


def wait_for_actors(cfg, plan: ActorPlan) -> None:
    """Wait until the cluster can hold the pool's ``min_actors`` (GPUs, ``extract.resources_per_actor``):
    an autoscaling cluster adds the nodes for the demand this places. Returns at once when the
    alive nodes already can.

    Raises:
        ConfigError: they did not appear within ``extract.resource_timeout_s`` (or
            ``$ASVP_RESOURCE_TIMEOUT_S``); the message names the missing resource.
    """
    asked = (f"extract.device={cfg.device} actors" if plan.device == "cuda" else "the extraction actors") + (
        f" with extract.resources_per_actor={plan.resources}" if plan.resources else "")
    fixes = (["set extract.device: cpu (or auto)"] if plan.device == "cuda" else []) + (
        ["change extract.resources_per_actor"] if plan.resources else []) + ["lower extract.min_actors"]
    wait_for_resources(plan.actor_bundle(), plan.min_actors, asked, " or ".join(fixes),
                       resource_timeout(cfg.resource_timeout_s))
