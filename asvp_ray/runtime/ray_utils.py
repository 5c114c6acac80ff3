"""Connecting to Ray: a local instance on a laptop, the cluster ``ray.init`` finds elsewhere."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from typing import Dict, Iterator, Optional, Tuple

log = logging.getLogger(__name__)

# Ray Data's logging configuration for local instances: its default with a WARNING console
RAY_DATA_LOGGING_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_data_logging.yaml")


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, quiet: bool = True) -> None:
    """Start or join Ray once per process.

    Args:
        address: a cluster address; default: ``$RAY_ADDRESS`` if set, else a new local instance.
        num_cpus: CPUs of a new local instance (default: all of this machine's).
        quiet: silence Ray Data's own progress bars (asvp-ray draws its own).

    On every path (a new local instance, a cluster joined by address, a ``ray job submit``
    entrypoint) the job's workers run :func:`quiet_worker` at start (``runtime_env``'s
    ``worker_process_setup_hook``), so the console shows the same lines everywhere: asvp-ray's
    own, Ray's warnings and errors, not Ray Data's INFO lines or Ray Train's preemption watcher.

    A new local instance starts Ray's dashboard unless ``$ASVP_RAY_DASHBOARD`` is ``0`` (the test
    suite sets it: about 2.5 s less per start-up here, and one process less on a 2-CPU machine).
    """
    import ray

    if not ray.is_initialized():
        # torch is loaded before this process connects to Ray, never after: in the entrypoint of a
        # `ray job submit` (the first job of a freshly started cluster, reproducibly here) an
        # `import torch` after `ray.init()` dies in oneMKL's start-up inside libtorch_cpu
        # ("Intel oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so", exit 2, or a segfault),
        # while `import torch; ray.init()` works. Nothing in asvp-ray runs without torch anyway.
        import torch  # noqa: F401

        address = address or os.environ.get("RAY_ADDRESS")
        kwargs = dict(ignore_reinit_error=True, log_to_driver=True, logging_level=logging.WARNING)
        # This process first (Ray Data runs here for `asvp-ray extract`; a local instance started
        # below inherits these variables), then every worker of the job, on every node.
        quiet_worker()
        runtime_env = _quiet_runtime_env()
        if runtime_env:
            kwargs["runtime_env"] = runtime_env
        if not address:
            if os.environ.get("ASVP_RAY_DASHBOARD", "1") == "0":
                kwargs["include_dashboard"] = False  # CI and tests: a new local instance without the dashboard
            # A local instance inherits this process's environment. Ray Train's controller polls
            # its workers every 2 s by default, so a short fine-tune ends up to 2 s after its last
            # step; 0.5 s costs nothing on one machine (measured: a 1-epoch fine-tune on 100
            # images, 19.2 -> 15.8 s). A cluster keeps its own setting.
            os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        if address:
            ray.init(address=address, **kwargs)
        elif num_cpus is not None:  # always a fresh local instance of that size
            ray.init(address="local", num_cpus=num_cpus, **kwargs)
        else:  # a cluster started with `ray start` on this machine, else a new local instance
            ray.init(**kwargs)
    if quiet:
        quiet_ray_data()


# Ray Train's dataset manager (Ray's own code, ray/train/_internal/data_config.py
# `default_ingest_options`) copies DataContext's `exclude_resources` into the ExecutionOptions it
# builds, a field Ray Data itself has deprecated: a RayDeprecationWarning per fine-tune on the
# console, raised in Ray Train's DatasetManager actor, that no asvp-ray user can act on.
EXCLUDE_RESOURCES_DEPRECATION = r"`ExecutionOptions\.exclude_resources` is deprecated"

# The variable Ray sets to the job's runtime_env for a `ray job submit` entrypoint (the value of
# ray._private.runtime_env.constants.RAY_JOB_CONFIG_JSON_ENV_VAR).
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def quiet_worker() -> None:
    """What the console shows from this process: called by ``init_ray`` in the process that
    connects, and in every worker process of the job at start (``runtime_env``'s
    ``worker_process_setup_hook``, on every node; a local instance, a joined cluster or a
    submitted job alike). Each setting is a default: a value already in the environment (the
    node's, or the job's ``runtime_env`` ``env_vars``) is kept.

    - Ray Data: no progress bars of its own (asvp-ray draws one per extraction); its INFO lines
      ("Dataset ... execution finished") and the "Progress bars disabled" notice go to the
      session's ``logs/ray-data/ray-data.log`` only, warnings and errors still to the console
      (``ray_data_logging.yaml`` through ``RAY_DATA_LOGGING_CONFIG``, this node's copy).
    - Ray Train: no preemption watcher (``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``): one actor
      process less per fine-tune (a 1-worker fine-tune of 120 images 19.4 -> 14.1 s on one
      machine), and its core worker's "constructor arguments in the object store" ERROR line
      leaves the console. asvp-ray's training loop does not read Ray Train's preemption info; a
      worker lost with its node still restarts the worker group from the last checkpoint
      (``train.max_failures``). Set the variable to 1 on the nodes or in the job's runtime_env to
      keep the watcher.
    - Python warnings: Ray Train's ``exclude_resources`` deprecation (``EXCLUDE_RESOURCES_DEPRECATION``)
      is ignored; every other warning is shown as before.
    """
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if "RAY_DATA_LOGGING_CONFIG" not in os.environ and os.path.isfile(RAY_DATA_LOGGING_CONFIG):
        os.environ["RAY_DATA_LOGGING_CONFIG"] = RAY_DATA_LOGGING_CONFIG
        import sys

        if "ray.data" in sys.modules:  # already configured from the default at its import: again
            try:
                from ray.data._internal.logging import configure_logging

                configure_logging()
            except Exception:  # noqa: BLE001 - a Ray without it: Ray Data's default logging
                log.debug("could not apply %s to Ray Data's loggers", RAY_DATA_LOGGING_CONFIG, exc_info=True)
    import warnings

    # Imported first: its import adds Ray's own "module" filter for RayDeprecationWarning in
    # front of the list, which would otherwise shadow the filter added here.
    from ray.util.annotations import RayDeprecationWarning

    warnings.filterwarnings("ignore", message=EXCLUDE_RESOURCES_DEPRECATION, category=RayDeprecationWarning)


def _quiet_runtime_env() -> dict:
    """The ``runtime_env`` for ``ray.init`` that runs :func:`quiet_worker` in every worker of the
    job, or ``{}`` where a submitted job's own runtime_env already has a setup hook (Ray refuses
    two; the job's wins)."""
    hook = f"{__name__}.{quiet_worker.__name__}"
    raw = os.environ.get(_JOB_CONFIG_ENV)
    if raw:
        import json

        try:
            job_env = (json.loads(raw) or {}).get("runtime_env") or {}
        except (ValueError, AttributeError):
            job_env = {}
        has_hook = bool(job_env.get("worker_process_setup_hook")) or any(
            "SETUP_HOOK" in k for k in (job_env.get("env_vars") or {}))
        if has_hook:
            log.info("the job's runtime_env has its own worker_process_setup_hook; asvp-ray's (%s) is left out, so "
                     "Ray Data's INFO lines and Ray Train's preemption watcher may show on the console", hook)
            return {}
    return {"worker_process_setup_hook": hook}


def quiet_ray_data() -> None:
    """Turn off Ray Data's per-operator progress bars and start-up prints in this process
    (asvp-ray draws one bar per extraction instead). Call it in every process that runs a dataset."""
    from ray.data import DataContext

    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False


_WRAPPED = re.compile(r"asvp_ray\.errors\.(\w+): (.+)")


def unwrap_error(e: BaseException) -> BaseException:
    """The user-facing asvp-ray error inside Ray's wrappers (RayTaskError, UserCodeException).

    Ray re-raises a remote exception as a wrapper whose text holds the original's
    ``asvp_ray.core.errors.Name: message`` line; that error is rebuilt so the user sees the message
    (which names the item and the fix) rather than Ray's stack. Returns ``e`` itself when it
    holds no asvp-ray error.
    """
    import asvp_ray.core.errors as errors

    cur: Optional[BaseException] = e
    for _ in range(10):
        if cur is None:
            break
        if type(cur).__module__ == errors.__name__:
            return cur
        cur = cur.__cause__ or getattr(cur, "cause", None)
    found = _WRAPPED.findall(str(e))
    if found:
        name, msg = found[-1]
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, errors.AsvpError):
            return cls(msg.strip())
    return e


@contextlib.contextmanager
def asvp_errors_unwrapped() -> Iterator[None]:
    """Re-raise an asvp-ray error that Ray wrapped (a remote task, actor, Ray Data or Ray Train
    worker raised it) as itself, without Ray's stack; other exceptions pass unchanged.

    Usage::

        with asvp_errors_unwrapped():
            result = trainer.fit()
    """
    from asvp_ray.core.errors import AsvpError

    try:
        yield
    except Exception as e:  # noqa: BLE001 - surface the user-facing cause, not Ray's wrapper
        inner = unwrap_error(e)
        if inner is not e and isinstance(inner, AsvpError):
            raise inner from None
        raise


def cluster_capacity() -> Tuple[Dict[str, float], bool]:
    """What the cluster can become: per resource, the nodes up now or, when an autoscaler is
    configured (its node types, wherever it keeps them: :mod:`asvp_ray.runtime.node_types`), the larger
    of that and what its node types can add up to. Every plan that asks "can this ever run" reads
    this, not ``ray.cluster_resources()`` at one instant: on an autoscaling cluster an idle worker
    group scales to zero between phases.

    Returns:
        (resources, autoscaling): e.g. ``({"CPU": 8.0, "GPU": 4.0}, True)``.
    """
    import ray

    now = {str(k): float(v) for k, v in ray.cluster_resources().items()}
    from asvp_ray.runtime.node_types import max_resources

    top = max_resources(now)
    if not top:
        return now, False
    out = dict(now)
    for r, v in top.items():
        out[str(r)] = max(out.get(str(r), 0.0), float(v))
    return out, True


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


def capacity_line(now: Dict[str, float], can: Dict[str, float], autoscaling: bool) -> str:
    """One line for plans' logs and errors: ``now 2 CPU, 0 GPU; can grow to 10 CPU, 4 GPU``, or
    ``now 2 CPU, 0 GPU (no autoscaler)``."""
    keys = ("CPU", "GPU")
    a = ", ".join(f"{float(now.get(r, 0)):g} {r}" for r in keys)
    b = ", ".join(f"{float(can.get(r, 0)):g} {r}" for r in keys)
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

    from asvp_ray.core.errors import ConfigError

    try:
        held = {k: float(v) for k, v in ray.get_runtime_context().get_assigned_resources().items()}
    except Exception:  # noqa: BLE001 - a driver process holds nothing
        held = {}
    can, autoscaling = cluster_capacity()
    for r, n in need.items():
        if n > 0 and n > float(can.get(r, 0.0)) + 1e-9:
            raise ConfigError(
                f"{what} need {n:g} {r} but the cluster can never have that many "
                f"({capacity_line(ray.cluster_resources(), can, autoscaling)}), so they would wait forever; "
                f"shrink {fix}" + (f", or add {r}s (a node type with {r} in the autoscaler's config)"
                                   if autoscaling else f", or add nodes with {r}"))
    total = can  # already the larger of the nodes now and what the autoscaler may add
    for r, n in need.items():
        have, mine = float(total.get(r, 0.0)), held.get(r, 0.0)
        if n > 0 and mine > 0 and n > have - mine + 1e-9:
            raise ConfigError(
                f"{what} need {n:g} {r} but the cluster has {have:g} {r} and this Ray task/actor holds {mine:g} of "
                f"them while it waits, so they could never start; launch asvp-ray with fewer {r}s reserved (e.g. "
                f"num_cpus=0 for a process that only drives the run, as `asvp-ray run` does) or shrink {fix}")
    free = ray.available_resources()
    deadline = time.monotonic() + grace_s  # the previous phase's workers may still be releasing theirs
    while time.monotonic() < deadline and any(n > float(free.get(r, 0.0)) + 1e-9 for r, n in need.items() if n > 0):
        time.sleep(0.5)
        free = ray.available_resources()
    for r, n in need.items():
        if n > 0 and n > float(free.get(r, 0.0)) + 1e-9:
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
    from asvp_ray.core.errors import ConfigError

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


def _alive_nodes() -> list:
    import ray

    return [{k: float(v) for k, v in n.get("Resources", {}).items()} for n in ray.nodes() if n.get("Alive")]


def _fits(bundle: Dict[str, float], node: Dict[str, float]) -> bool:
    return all(node.get(r, 0.0) + 1e-9 >= n for r, n in bundle.items())


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

    from asvp_ray.core.errors import ConfigError

    bundle = {r: float(n) for r, n in bundle.items() if n > 0}
    if not bundle or count < 1:
        return

    def placeable(nodes) -> bool:
        left = [dict(n) for n in nodes]
        for _ in range(count):  # first fit by node totals: is there room for count units at all
            node = next((n for n in left if _fits(bundle, n)), None)
            if node is None:
                return False
            for r, n in bundle.items():
                node[r] = node.get(r, 0.0) - n
        return True

    if placeable(_alive_nodes()):
        return
    total = ray.cluster_resources()
    log.warning("%s need %d x %s, which the cluster's nodes cannot hold now (it has %s); asking the autoscaler for "
                "nodes and waiting up to %.0f s (%s overrides it)", what, count, _fmt(bundle), _fmt(total), timeout_s,
                RESOURCE_TIMEOUT_ENV)
    t0 = time.monotonic()
    pg = placement_group([dict(bundle) for _ in range(count)], strategy="PACK")
    try:
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    finally:
        remove_placement_group(pg)
    if ready:
        log.info("%s: the resources appeared after %.0f s (the cluster now has %s)", what, time.monotonic() - t0,
                 _fmt(ray.cluster_resources()))
        return
    nodes = _alive_nodes()
    total = ray.cluster_resources()
    missing = [r for r in bundle if not any(n.get(r, 0.0) + 1e-9 >= bundle[r] for n in nodes)]
    if missing:
        why = "; ".join(f"no node has {bundle[r]:g} {r} (the cluster has {float(total.get(r, 0.0)):g} {r} in all)"
                        for r in missing)
    else:
        why = f"no set of nodes holds {count} x {_fmt(bundle)} at once (the cluster has {_fmt(total)})"
    raise ConfigError(
        f"{what} waited {timeout_s:.0f} s for {count} x {_fmt(bundle)} but the resources never appeared: {why}. "
        f"Start a node that has them (on an autoscaling cluster: a node type declaring "
        f"{', '.join(missing or list(bundle))} with max_workers > 0; `ray status` shows the pending demand), "
        f"raise the timeout ({RESOURCE_TIMEOUT_ENV} or the config's resource_timeout_s), or {fix}")


def _fmt(res: Dict[str, float]) -> str:
    keys = [k for k in res if not k.startswith(("node:", "accelerator_type:")) and "memory" not in k]
    return "{" + ", ".join(f"{k}: {float(res[k]):g}" for k in sorted(keys)) + "}"
