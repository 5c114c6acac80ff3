"""The cluster's resources as every plan reads them, in one place.

- Capacity views: :func:`resources_now` (the nodes up now), :func:`cluster_capacity` (what the
  cluster can become: the nodes now or what the autoscaler's node types add up to),
  :func:`cpu_gpu_capacity` (the same, CPU and GPU only), :func:`largest_cpu_node` (the largest CPU
  node type the autoscaler can add), :func:`alive_nodes`, :func:`this_node`
  (the node this process runs on), :func:`node_cpus` (the CPUs this process may run on).
- Formatting: :func:`capacity_line` ("now 2 CPU, 0 GPU; can grow to 10 CPU, 4 GPU"),
  :func:`format_cpu_gpu`, :func:`format_bundle`; CPU/GPU arithmetic: :func:`add_cpu_gpu`,
  :func:`max_cpu_gpu`.
- Fit checks: :func:`fits`, :func:`placeable` (pure), :func:`check_nested` (nested Ray work that
  could never start, or has to wait), :func:`wait_for_resources` (asks an autoscaler for nodes,
  :func:`resource_timeout`).

The consumers size their own work from these: the extraction actor pool
(:mod:`asvp_ray.features.extract_plan`), the Ray Train worker group
(:meth:`asvp_ray.train.config.TrainConfig.plan`), a study's concurrency
(:mod:`asvp_ray.tune.resources`) and the pool's placement (:mod:`asvp_ray.loop.versions`).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Dict, List, Tuple

from asvp_ray.core.errors import ConfigError

log = logging.getLogger(__name__)

#: the resources plans count in their own arithmetic (custom resources pass through bundles)
RESOURCES = ("CPU", "GPU")
#: slack of every resource comparison (fractional CPUs add up with rounding errors)
EPS = 1e-9


def resources_now() -> Dict[str, float]:
    """The cluster's total resources at this instant (``ray.cluster_resources()``, as floats)."""
    import ray

    return {str(k): float(v) for k, v in ray.cluster_resources().items()}


def alive_nodes() -> List[Dict[str, float]]:
    """The total resources of each alive node."""
    import ray

    return [{k: float(v) for k, v in n.get("Resources", {}).items()} for n in ray.nodes() if n.get("Alive")]


def cpu_gpu(res: Dict[str, float]) -> Dict[str, float]:
    """``res`` restricted to :data:`RESOURCES` (missing ones as 0)."""
    return {r: float(res.get(r, 0.0)) for r in RESOURCES}


def add_cpu_gpu(a: Dict[str, float], b: Dict[str, float]) -> Dict[str, float]:
    """CPU and GPU of ``a`` plus ``b``."""
    return {r: a.get(r, 0.0) + b.get(r, 0.0) for r in RESOURCES}


def max_cpu_gpu(a: Dict[str, float], b: Dict[str, float]) -> Dict[str, float]:
    """Per resource, the larger CPU and GPU of ``a`` and ``b`` (phases that run one at a time)."""
    return {r: max(a.get(r, 0.0), b.get(r, 0.0)) for r in RESOURCES}


def format_cpu_gpu(d: Dict[str, float]) -> str:
    """``"2 CPU, 1 GPU"`` (amounts above zero only), or ``"nothing"``."""
    return ", ".join(f"{d[r]:g} {r}" for r in RESOURCES if d.get(r, 0) > 0) or "nothing"


def cluster_capacity() -> Tuple[Dict[str, float], bool]:
    """What the cluster can become: per resource, the nodes up now or, when an autoscaler is
    configured (its node types, wherever it keeps them: :mod:`asvp_ray.runtime.node_types`), the larger
    of that and what its node types can add up to. Every plan that asks "can this ever run" reads
    this, not ``ray.cluster_resources()`` at one instant: on an autoscaling cluster an idle worker
    group scales to zero between phases.

    Returns:
        (resources, autoscaling): e.g. ``({"CPU": 8.0, "GPU": 4.0}, True)``.
    """
    now = resources_now()
    from asvp_ray.runtime.node_types import max_resources

    top = max_resources(now)
    if not top:
        return now, False
    out = dict(now)
    for r, v in top.items():
        out[str(r)] = max(out.get(str(r), 0.0), float(v))
    return out, True


def largest_cpu_node() -> float:
    """CPUs of the largest node type the autoscaler can add that has no GPU (0: none)."""
    from asvp_ray.runtime.node_types import node_types

    return max([float(t["resources"].get("CPU", 0)) for t in node_types()
                if not t["head"] and not t["resources"].get("GPU", 0) and t["max"] != 0] or [0.0])


def cpu_gpu_capacity() -> Tuple[Dict[str, float], bool]:
    """CPU and GPU of :func:`cluster_capacity` (the one capacity view every plan reads)."""
    top, autoscaling = cluster_capacity()
    return cpu_gpu(top), autoscaling


def this_node() -> Dict[str, object]:
    """The node this process runs on, as Ray sees it: ``memory`` (bytes: the node's ``memory``
    resource, what Ray gives tasks and actors there; before Ray is initialised, this machine's
    memory, its container's limit where lower), ``resources`` (the node's totals), ``alive_nodes``
    (the cluster's, 1 before Ray) and ``source`` (where the memory figure came from, for logs).
    Not a capacity view: what the cluster can become is :func:`cluster_capacity`."""
    import ray

    if ray.is_initialized():
        me = ray.get_runtime_context().get_node_id()
        alive = [n for n in ray.nodes() if n.get("Alive")]
        node = next((n for n in alive if n.get("NodeID") == me), None)
        res = {str(k): float(v) for k, v in (node or {}).get("Resources", {}).items()}
        if res.get("memory"):
            return {"memory": res["memory"], "resources": res, "alive_nodes": len(alive),
                    "source": f"Ray's memory resource of node {node.get('NodeManagerAddress', me)}"}
    from ray._private.utils import get_system_memory  # cgroup-aware: a pod's limit, not its host's memory

    try:
        total = float(get_system_memory())
    except Exception:  # noqa: BLE001 - no psutil / cgroup files: the kernel's page count
        total = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return {"memory": total, "resources": {}, "alive_nodes": 1, "source": "this machine's memory"}


def node_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def capacity_line(now: Dict[str, float], can: Dict[str, float], autoscaling: bool) -> str:
    """One line for plans' logs and errors: ``now 2 CPU, 0 GPU; can grow to 10 CPU, 4 GPU``, or
    ``now 2 CPU, 0 GPU (no autoscaler)``."""
    a = ", ".join(f"{float(now.get(r, 0)):g} {r}" for r in RESOURCES)
    b = ", ".join(f"{float(can.get(r, 0)):g} {r}" for r in RESOURCES)
    return f"now {a}; can grow to {b}" if autoscaling else f"now {a} (no autoscaler)"


def check_nested(need: Dict[str, float], what: str, fix: str, grace_s: float = 5.0) -> None:
    """Before starting nested Ray work (a Ray Train worker group, an extraction actor pool) from this
    process: raise when it can never start, say why when it has to wait.

    It can never start when it needs more than the cluster has besides what this process itself holds
    (an ``asvp-ray run`` inside a Ray task or actor that reserved CPUs, a Tune trial): those stay
    held while it waits. It waits (logged, with the numbers) when other work holds the rest now.

    Args:
        need: ``{"CPU": n, "GPU": m}`` the nested work reserves.
        what: what it is, for the messages ("Ray Train workers").
        fix: the settings that shrink it.
        grace_s: how long resources may take to come free (the previous phase releasing them)
            before the wait is logged.

    It can also never start when it needs more than the cluster can ever have (``cluster_capacity``:
    the nodes up now and what the autoscaler may add).

    Raises:
        ConfigError: it needs more than the cluster can grow to, or more than the cluster minus
            what this process holds.
    """
    import ray


    try:
        held = {k: float(v) for k, v in ray.get_runtime_context().get_assigned_resources().items()}
    except Exception:  # noqa: BLE001 - a driver process holds nothing
        held = {}
    can, autoscaling = cluster_capacity()
    for r, n in need.items():
        if n > 0 and n > float(can.get(r, 0.0)) + EPS:
            raise ConfigError(
                f"{what} need {n:g} {r} but the cluster can never have that many "
                f"({capacity_line(ray.cluster_resources(), can, autoscaling)}), so they would wait forever; "
                f"shrink {fix}" + (f", or add {r}s (a node type with {r} in the autoscaler's config)"
                                   if autoscaling else f", or add nodes with {r}"))
    total = can  # already the larger of the nodes now and what the autoscaler may add
    for r, n in need.items():
        have, mine = float(total.get(r, 0.0)), held.get(r, 0.0)
        if n > 0 and mine > 0 and n > have - mine + EPS:
            raise ConfigError(
                f"{what} need {n:g} {r} but the cluster has {have:g} {r} and this Ray task/actor holds {mine:g} of "
                f"them while it waits, so they could never start; launch asvp-ray with fewer {r}s reserved (e.g. "
                f"num_cpus=0 for a process that only drives the run, as `asvp-ray run` does) or shrink {fix}")
    free = ray.available_resources()
    deadline = time.monotonic() + grace_s  # the previous phase's workers may still be releasing theirs
    while time.monotonic() < deadline and any(n > float(free.get(r, 0.0)) + EPS for r, n in need.items() if n > 0):
        time.sleep(0.5)
        free = ray.available_resources()
    for r, n in need.items():
        if n > 0 and n > float(free.get(r, 0.0)) + EPS:
            log.warning("%s need %g %s; %g of the cluster's %g are free now (%g held by this process, the rest by "
                        "other tasks, actors or jobs: see `ray status`), so they start when those free them",
                        what, n, r, float(free.get(r, 0.0)), float(total.get(r, 0.0)), held.get(r, 0.0))


# Overrides every ``*.resource_timeout_s`` (tests, or a cluster whose nodes take long to boot).
RESOURCE_TIMEOUT_ENV = "ASVP_RESOURCE_TIMEOUT_S"


def resource_timeout(configured: float) -> float:
    """Seconds to wait for resources to appear: ``$ASVP_RESOURCE_TIMEOUT_S`` when set, else ``configured``.

    Raises:
        ConfigError: the variable is set but not a positive number.
    """

    raw = os.environ.get(RESOURCE_TIMEOUT_ENV, "").strip()
    if not raw:
        return float(configured)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{RESOURCE_TIMEOUT_ENV}={raw!r} is not a positive number of seconds; set it to e.g. 600 "
                          "or unset it")
    return value


def fits(bundle: Dict[str, float], node: Dict[str, float]) -> bool:
    """Whether ``node`` (a node's or the cluster's resources) holds ``bundle``."""
    return all(node.get(r, 0.0) + EPS >= n for r, n in bundle.items())


def placeable(bundle: Dict[str, float], count: int, nodes: List[Dict[str, float]]) -> bool:
    """Whether ``count`` units of ``bundle`` fit on ``nodes`` at once (first fit by node totals)."""
    left = [dict(n) for n in nodes]
    for _ in range(count):
        node = next((n for n in left if fits(bundle, n)), None)
        if node is None:
            return False
        for r, n in bundle.items():
            node[r] = node.get(r, 0.0) - n
    return True


def wait_for_resources(bundle: Dict[str, float], count: int, what: str, fix: str, timeout_s: float) -> None:
    """Make sure ``count`` bundles of ``bundle`` can ever be placed, asking an autoscaler for nodes if needed.

    When the alive nodes can hold them (by their total resources; busy ones free up later,
    which ``check_nested`` reports) this returns at once. Otherwise a Ray autoscaler only adds a
    node for *pending demand*, so this places it: a placement group of ``count`` such bundles,
    waited on for up to ``timeout_s`` and then removed (the new nodes stay for the work that
    follows; an autoscaler removes a node only after it idles). A cluster without an
    autoscaler just waits the timeout for a node someone starts by hand.

    Args:
        bundle: resources one unit reserves, e.g. ``{"CPU": 1, "GPU": 1}`` or ``{"CPU": 1, "extract_node": 1}``
            (zero amounts are ignored).
        count: how many such units must be placeable at once (GPU workers: one per worker).
        what: what asks, for the messages ("extract.device=cuda actors").
        fix: the settings that would avoid the wait, for the error.
        timeout_s: seconds to wait (see ``resource_timeout``).

    Raises:
        ConfigError: the resources did not appear within ``timeout_s``; names each missing resource,
            how much the alive nodes have, and the fix.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group


    bundle = {r: float(n) for r, n in bundle.items() if n > 0}
    if not bundle or count < 1:
        return

    if placeable(bundle, count, alive_nodes()):  # is there room for count units at all
        return
    total = ray.cluster_resources()
    log.warning("%s need %d x %s, which the cluster's nodes cannot hold now (it has %s); asking the autoscaler for "
                "nodes and waiting up to %.0f s (%s overrides it)", what, count, format_bundle(bundle),
                format_bundle(total), timeout_s, RESOURCE_TIMEOUT_ENV)
    t0 = time.monotonic()
    pg = placement_group([dict(bundle) for _ in range(count)], strategy="PACK")
    try:
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    finally:
        remove_placement_group(pg)
    if ready:
        log.info("%s: the resources appeared after %.0f s (the cluster now has %s)", what, time.monotonic() - t0,
                 format_bundle(ray.cluster_resources()))
        return
    nodes = alive_nodes()
    total = ray.cluster_resources()
    missing = [r for r in bundle if not any(n.get(r, 0.0) + EPS >= bundle[r] for n in nodes)]
    if missing:
        why = "; ".join(f"no node has {bundle[r]:g} {r} (the cluster has {float(total.get(r, 0.0)):g} {r} in all)"
                        for r in missing)
    else:
        why = (f"no set of nodes holds {count} x {format_bundle(bundle)} at once (the cluster has "
               f"{format_bundle(total)})")
    raise ConfigError(
        f"{what} waited {timeout_s:.0f} s for {count} x {format_bundle(bundle)} but the resources never appeared: "
        f"{why}. "
        f"Start a node that has them (on an autoscaling cluster: a node type declaring "
        f"{', '.join(missing or list(bundle))} with max_workers > 0; `ray status` shows the pending demand), "
        f"raise the timeout ({RESOURCE_TIMEOUT_ENV} or the config's resource_timeout_s), or {fix}")


def format_bundle(res: Dict[str, float]) -> str:
    """``{CPU: 1, GPU: 1}``: a bundle or the cluster's resources, without node and memory entries."""
    keys = [k for k in res if not k.startswith(("node:", "accelerator_type:")) and "memory" not in k]
    return "{" + ", ".join(f"{k}: {float(res[k]):g}" for k in sorted(keys)) + "}"
