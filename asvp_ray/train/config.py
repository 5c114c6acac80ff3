"""Typed settings of a fine-tuning job (Ray Train), self-contained so the main ``Config`` can
hold one as ``train:`` (refresh / standard AL) and another as ``final:`` (the final model).

Field-level checks happen when the model is built; checks that need the cluster (GPUs, CPUs)
happen in ``TrainConfig.plan`` when the job starts, and every error names the fix.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Tuple, Union

from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator,
                      model_validator)

from asvp_ray.core.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerPlan:
    """How the Ray Train worker group is sized, resolved against the cluster.

    Attributes:
        num_workers: training workers (DDP ranks).
        use_gpu: one GPU per worker (NCCL) or CPU workers (gloo).
        resources_per_worker: the Ray resources each worker reserves.
        torch_threads: intra-op threads per worker.
        loader_workers: batches each training worker prepares ahead (Ray Data's ``prefetch_batches``,
            at least 1), collated and augmented by as many threads in the worker (Ray Data caps
            them at 4); not DataLoader processes.
    """

    num_workers: int
    use_gpu: bool
    resources_per_worker: Dict[str, float]
    torch_threads: int
    loader_workers: int = 0


# CPUs a GPU worker takes by default: one for the training loop, the rest for loader workers that
# decode and augment; capped by the CPUs per GPU of the smallest GPU node.
GPU_WORKER_CPUS = 4


def default_worker_cpus(use_gpu: bool, nodes: Optional[List[Dict[str, float]]] = None) -> float:
    """CPUs a training worker reserves when ``train.cpus_per_worker`` is unset.

    Args:
        use_gpu: the workers train on GPUs.
        nodes: the resources of each alive node (``ray.nodes()``' ``Resources``); None: unknown.

    Returns:
        1 for CPU workers (their torch threads); for GPU workers ``GPU_WORKER_CPUS``, or fewer when
        a GPU node has fewer CPUs per GPU (a worker that asks for more could never be placed).
    """
    if not use_gpu:
        return 1.0
    per_gpu = [n.get("CPU", 0.0) / n["GPU"] for n in (nodes or []) if n.get("GPU", 0.0) > 0]
    fit = int(min(per_gpu)) if per_gpu else GPU_WORKER_CPUS
    return float(max(1, min(GPU_WORKER_CPUS, fit)))


def default_loader_workers(use_gpu: bool, cpus_per_worker: float, augment: bool) -> int:
    """``train.loader_workers`` when it is unset: Ray Data prefetch batches (and so collate and
    augmentation threads) per training worker. On GPU workers that augment, every reserved CPU
    but the training loop's; otherwise 0, which still prefetches one batch (the un-augmented
    batches are plain uint8 slices, preprocessed on the device)."""
    if not use_gpu or not augment:
        return 0
    return max(0, int(cpus_per_worker) - 1)


class TrainConfig(BaseModel):
    """Fine-tuning settings (linear probe, FT, LP-FT).

    The FT recipe follows the paper's reference: SGD with momentum, separate learning rates for
    the backbone and the new head, learning rate x0.1 at 60% and 80% of the epochs.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    num_workers: PositiveInt = Field(1, description="DDP workers (Ray Train workers)")
    use_gpu: Union[Literal["auto"], bool] = Field(
        "auto", description="auto: one GPU per worker when the cluster has enough GPUs now, else CPU (logged, with "
                            "why); true: GPU workers only, waiting up to resource_timeout_s for GPU nodes (an "
                            "autoscaler adds them), never CPU; false: CPU workers")
    resource_timeout_s: PositiveFloat = Field(
        600.0, description="with use_gpu: true, how long to wait for the cluster to have a GPU per worker before "
                           "failing with the missing resource; $ASVP_RESOURCE_TIMEOUT_S overrides it")
    cpus_per_worker: Optional[PositiveFloat] = Field(
        None, description="CPUs each worker reserves (and its torch threads); unset: 1 on CPU workers, 4 on GPU "
                          "workers (fewer where a GPU node has fewer CPUs per GPU), for the loader workers")
    epochs: NonNegativeInt = Field(10, description="full fine-tuning epochs (ft, and lpft's second phase)")
    batch_size: PositiveInt = Field(64, description="per-worker batch size")
    backbone_lr: PositiveFloat = 0.01
    head_lr: PositiveFloat = 0.1
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    lp_epochs: NonNegativeInt = Field(5, description="linear-probe epochs (linear_probe, and lpft's first phase)")
    lp_lr: PositiveFloat = Field(0.1, description="head learning rate while the backbone is frozen")
    amp: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto", description="mixed precision of GPU workers: auto (bf16 on compute capability >= 8.0, else fp16 "
                            "with a gradient scaler), off, bf16 (refused on older cards), fp16; CPU workers always "
                            "train in float32")
    augment: bool = Field(True, description="random resized crop + horizontal flip (timm) while training")
    freeze_bn: bool = Field(
        False, description="keep BatchNorm running statistics fixed while fine-tuning (affine weights still "
                           "train); helps a pre-trained backbone whose statistics do not fit small batches or a "
                           "shifted domain, e.g. LP-FT's fine-tuning phase; wrong for a random-init backbone")
    crop_scale: Tuple[float, float] = Field((0.35, 1.0), description="random resized crop area range")
    loader_workers: Optional[NonNegativeInt] = Field(
        None, description="batches each training worker prepares ahead (Ray Data's prefetch_batches, at least "
                          "1), collated and augmented by as many threads in the worker (Ray Data caps them at 4), "
                          "not DataLoader processes; unset: 0 (one batch ahead) on CPU workers, on GPU workers "
                          "that augment every reserved CPU but one")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts from the last checkpoint (-1: no limit)")
    checkpoint_every: PositiveInt = Field(1, description="checkpoint every this many epochs (and the last one)")
    eval_every: NonNegativeInt = Field(
        1, description="evaluate the held-out set every this many epochs and always after the last one "
                       "(0: only after the last; each pass over a large test set can cost more than a "
                       "training epoch); keep=best chooses among the evaluated epochs")
    keep: Literal["best", "last"] = Field(
        "last", description="the model kept: the last epoch's, or the best by eval accuracy (train accuracy "
                            "when no eval set is given)")
    seed: int = 0

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_bool(cls, v):
        from asvp_ray.runtime.device import normalize_amp

        return normalize_amp(v, "train.amp") if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale={list(self.crop_scale)} must satisfy 0 < min <= max <= 1, "
                             "e.g. crop_scale: [0.35, 1.0]")
        return self

    def epochs_of(self, method: str) -> Tuple[int, int]:
        """(linear-probe epochs, full fine-tuning epochs) of ``method``.

        Raises:
            ConfigError: an unknown method, or one whose phases have no epochs.
        """
        if method == "linear_probe":
            plan = (self.lp_epochs, 0)
        elif method == "ft":
            plan = (0, self.epochs)
        elif method == "lpft":
            plan = (self.lp_epochs, self.epochs)
        else:
            raise ConfigError(f"unknown fine-tuning method {method!r}; use linear_probe, ft or lpft")
        need = {"linear_probe": ("lp_epochs",), "ft": ("epochs",), "lpft": ("lp_epochs", "epochs")}[method]
        zero = [k for k in need if getattr(self, k) == 0]
        if zero:
            raise ConfigError(f"method {method} needs {' and '.join(zero)} >= 1 (got 0); set "
                              + ", ".join(f"{k}: 5" for k in zero))
        return plan

    def plan(self, resources: Optional[Dict[str, float]] = None,
             nodes: Optional[List[Dict[str, float]]] = None) -> WorkerPlan:
        """Resolve ``use_gpu`` and the worker resources against the cluster.

        ``use_gpu: true`` never falls back to CPU: on the live cluster (``resources`` not given)
        it first waits up to ``resource_timeout_s`` for a GPU per worker, placing the demand an
        autoscaler adds GPU nodes for (``wait_for_resources``). ``auto`` logs its choice and why.

        Args:
            resources: cluster resources (default: ``ray.cluster_resources()``).
            nodes: per-node resources, for the GPU workers' default CPUs (default: the alive
                nodes of ``ray.nodes()`` when ``resources`` is not given).

        Raises:
            ConfigError: GPUs asked for but missing (after the wait, on the live cluster), or more
                CPUs/GPUs than the cluster has (the job would wait forever).
        """
        n = self.num_workers
        if resources is None:
            from asvp_ray.runtime.resources import (alive_nodes, capacity_line, cluster_capacity, resource_timeout,
                                                    resources_now, wait_for_resources)

            if self.use_gpu is True and resources_now().get("GPU", 0.0) < n:
                wait_for_resources({"GPU": 1.0}, n, f"train.use_gpu=true with num_workers={n}",
                                   f"set use_gpu: auto (CPU workers when no GPU is up) or num_workers: "
                                   f"{max(1, int(resources_now().get('GPU', 0.0)))}",
                                   resource_timeout(self.resource_timeout_s))
            # what the cluster can become, not this instant's nodes: an autoscaler's idle workers
            # scale to zero between fine-tunes, and the workers wait for it to add them back
            resources, autoscaling = cluster_capacity()
            log.info("Ray Train workers: the cluster has %s", capacity_line(resources_now(), resources, autoscaling))
            if nodes is None:
                nodes = alive_nodes()
        cpus = float(resources.get("CPU", 0))
        gpus = float(resources.get("GPU", 0))
        if self.use_gpu is True and gpus == 0:
            raise ConfigError("use_gpu=True but the cluster has no GPU; set use_gpu: auto or false")
        use_gpu = self.use_gpu is True or (self.use_gpu == "auto" and gpus >= n)
        if use_gpu and gpus < n:
            raise ConfigError(f"num_workers={n} with use_gpu=True needs {n} GPUs but the cluster has {gpus:g}; "
                              f"set num_workers: {int(gpus)} (one worker per GPU) or use_gpu: auto")
        if self.use_gpu == "auto":
            if use_gpu:
                log.info("use_gpu=auto: the cluster has %g GPU(s) for %d worker(s); training on GPU workers", gpus, n)
            elif gpus == 0:
                log.info("use_gpu=auto: no GPU in the cluster now (CPU: %g); training on CPU workers", cpus)
            else:
                log.info("use_gpu=auto: the cluster has %g GPU(s) now, fewer than num_workers=%d (one GPU each); "
                         "training on CPU workers (set num_workers: %d for GPU workers)", gpus, n, int(gpus))
        per_worker = self.cpus_per_worker
        if per_worker is None:
            per_worker = default_worker_cpus(use_gpu, nodes)
            if use_gpu and n * per_worker > cpus:  # a small cluster: share what there is
                per_worker = max(1.0, float(int(cpus // n))) if cpus >= n else per_worker
        need = n * per_worker
        if need > cpus + 1e-9:
            fit = int(cpus // per_worker)
            raise ConfigError(
                f"num_workers={n} x cpus_per_worker={per_worker:g} needs {need:g} CPUs but the cluster "
                f"has {cpus:g}, so the job would wait forever; set num_workers <= {max(fit, 1)}"
                + (f" or cpus_per_worker <= {cpus / n:g}" if cpus > 0 else ""))
        loader = self.loader_workers
        if loader is None:
            loader = default_loader_workers(use_gpu, per_worker, self.augment)
        res: Dict[str, float] = {"CPU": float(per_worker)}
        if use_gpu:
            res["GPU"] = 1.0
        return WorkerPlan(n, use_gpu, res, max(1, int(per_worker)), int(loader))
