"""The driver's process: the threads it computes with, and the modules it imports before its memory
baseline is taken (used by the Driver; ``loop/actor.py`` starts it as a Ray actor)."""
from __future__ import annotations

import os
from typing import Any, Dict

from asvp_ray.config import Config
from asvp_ray.methods import METHODS
from asvp_ray.runtime.resources import node_cpus


def compute_threads() -> Dict[str, Any]:
    """The threads this process computes with: torch's intra-op threads and ``OMP_NUM_THREADS``."""
    import torch

    return {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def default_threads() -> int:
    """Threads for the driver's own compute when ``driver_threads`` is not set: the CPUs Ray
    reserved for this process where it reserved some (a Tune trial's share), else every CPU of the
    node (the zero-CPU driver actor of `asvp-ray run`, or a plain process)."""
    import math

    try:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            res = ray.get_runtime_context().get_assigned_resources()
            cpus = res.get("CPU") or max([v for k, v in res.items() if k.startswith("CPU_group")] or [0])
            if cpus > 0:
                return max(1, math.ceil(cpus))
    except Exception:  # pragma: no cover - outside Ray, or an older runtime context
        pass
    return node_cpus()


def import_runtime_modules(cfg: Config) -> None:
    """Import what the run will use before the driver's memory baseline is taken (summary.json ->
    driver_memory measures growth above it): Ray Data (extraction / the embeddings import), the
    Parquet datasets, and torch's dynamo, which the proxy's first optimiser step imports (about
    150 MB of modules, the same for every pool size); fsspec's HTTP filesystem (aiohttp), which
    Ray Data's Parquet and CSV readers import to check the paths they get; timm (about 48 MB) when
    the pool has images to extract; Ray Train (about 8 MB) and the gRPC channel that Ray Data's
    ``materialize`` opens to the raylet when the method or the final model fine-tunes."""
    import importlib

    import pyarrow.dataset  # noqa: F401
    import ray.data  # noqa: F401
    import torch._dynamo  # noqa: F401

    optional = ["fsspec.implementations.http"]
    if cfg.data.pool.kind != "embeddings":
        import timm  # noqa: F401
    if METHODS.get(cfg.method).finetunes(cfg) or cfg.final.training_method != "none":
        import ray.train.torch  # noqa: F401

        optional.append("ray._private.grpc_utils")
    for name in optional:  # what Ray imports lazily, where it is installed
        try:
            importlib.import_module(name)
        except ImportError:
            pass
