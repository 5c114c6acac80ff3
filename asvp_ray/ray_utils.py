"""Connecting to Ray: a local instance on a laptop, the cluster ``ray.init`` finds elsewhere."""
from __future__ import annotations

import logging
import os
from typing import Optional

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
