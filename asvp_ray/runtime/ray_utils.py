"""Connecting to Ray: a local instance on a laptop, the cluster ``ray.init`` finds elsewhere."""
from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Iterator, Optional

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


_WRAPPED = re.compile(r"asvp_ray\.(?:core\.)?errors\.(\w+): (.+)")


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
