"""Connecting to Ray: a local instance on a laptop, the cluster ``ray.init`` finds elsewhere."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from typing import Dict, Iterator, Optional

log = logging.getLogger(__name__)


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, quiet: bool = True) -> None:
    """Start or join Ray once per process.

    Args:
        address: a cluster address; default: ``$RAY_ADDRESS`` if set, else a new local instance.
        num_cpus: CPUs of a new local instance (default: all of this machine's).
        quiet: silence Ray Data's own progress bars (asvp-ray draws its own).
    """
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        kwargs = dict(ignore_reinit_error=True, log_to_driver=True, logging_level=logging.WARNING)
        if address:
            ray.init(address=address, **kwargs)
        elif num_cpus is not None:  # always a fresh local instance of that size
            ray.init(address="local", num_cpus=num_cpus, **kwargs)
        else:  # a cluster started with `ray start` on this machine, else a new local instance
            ray.init(**kwargs)
    if quiet:
        quiet_ray_data()


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
    ``asvp_ray.errors.Name: message`` line; that error is rebuilt so the user sees the message
    (which names the item and the fix) rather than Ray's stack. Returns ``e`` itself when it
    holds no asvp-ray error.
    """
    import asvp_ray.errors as errors

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
    from asvp_ray.errors import AsvpError

    try:
        yield
    except Exception as e:  # noqa: BLE001 - surface the user-facing cause, not Ray's wrapper
        inner = unwrap_error(e)
        if inner is not e and isinstance(inner, AsvpError):
            raise inner from None
        raise


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

    Raises:
        ConfigError: it needs more than the cluster minus what this process holds.
    """
    import ray

    from asvp_ray.errors import ConfigError

    try:
        held = {k: float(v) for k, v in ray.get_runtime_context().get_assigned_resources().items()}
    except Exception:  # noqa: BLE001 - a driver process holds nothing
        held = {}
    total = ray.cluster_resources()
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
