"""Typed settings of a fine-tuning job (Ray Train), self-contained so the main ``Config`` can
hold one as ``train:`` (refresh / standard AL) and another as ``final:`` (the final model).

Field-level checks happen when the model is built; checks that need the cluster (GPUs, CPUs)
happen in ``TrainConfig.plan`` when the job starts, and every error names the fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from asvp_ray.errors import ConfigError


@dataclass(frozen=True)
class WorkerPlan:
    """How the Ray Train worker group is sized, resolved against the cluster.

    Attributes:
        num_workers: training workers (DDP ranks).
        use_gpu: one GPU per worker (NCCL) or CPU workers (gloo).
        resources_per_worker: the Ray resources each worker reserves.
        torch_threads: intra-op threads per worker.
    """

    num_workers: int
    use_gpu: bool
    resources_per_worker: Dict[str, float]
    torch_threads: int


class TrainConfig(BaseModel):
    """Fine-tuning settings (linear probe, FT, LP-FT).

    The FT recipe follows the paper's reference: SGD with momentum, separate learning rates for
    the backbone and the new head, learning rate x0.1 at 60% and 80% of the epochs.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    num_workers: PositiveInt = Field(1, description="DDP workers (Ray Train workers)")
    use_gpu: Union[Literal["auto"], bool] = Field(
        "auto", description="auto: one GPU per worker when the cluster has enough GPUs, else CPU")
    cpus_per_worker: PositiveFloat = Field(1.0, description="CPUs each worker reserves (and its torch threads)")
    epochs: NonNegativeInt = Field(10, description="full fine-tuning epochs (ft, and lpft's second phase)")
    batch_size: PositiveInt = Field(64, description="per-worker batch size")
    backbone_lr: PositiveFloat = 0.01
    head_lr: PositiveFloat = 0.1
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    lp_epochs: NonNegativeInt = Field(5, description="linear-probe epochs (linear_probe, and lpft's first phase)")
    lp_lr: PositiveFloat = Field(0.1, description="head learning rate while the backbone is frozen")
    amp: bool = Field(True, description="bf16 autocast on GPU workers (ignored on CPU)")
    augment: bool = Field(True, description="random resized crop + horizontal flip (timm) while training")
    freeze_bn: bool = Field(
        False, description="keep BatchNorm running statistics fixed while fine-tuning (affine weights still "
                           "train); helps a pre-trained backbone whose statistics do not fit small batches or a "
                           "shifted domain, e.g. LP-FT's fine-tuning phase; wrong for a random-init backbone")
    crop_scale: Tuple[float, float] = Field((0.35, 1.0), description="random resized crop area range")
    loader_workers: NonNegativeInt = Field(0, description="DataLoader worker processes per training worker")
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

    def plan(self, resources: Optional[Dict[str, float]] = None) -> WorkerPlan:
        """Resolve ``use_gpu`` and the worker resources against the cluster.

        Args:
            resources: cluster resources (default: ``ray.cluster_resources()``).

        Raises:
            ConfigError: GPUs asked for but missing, or more CPUs/GPUs than the cluster has
                (the job would wait forever).
        """
        if resources is None:
            import ray

            resources = ray.cluster_resources()
        cpus = float(resources.get("CPU", 0))
        gpus = float(resources.get("GPU", 0))
        n = self.num_workers
        if self.use_gpu is True and gpus == 0:
            raise ConfigError("use_gpu=True but the cluster has no GPU; set use_gpu: auto or false")
        use_gpu = self.use_gpu is True or (self.use_gpu == "auto" and gpus >= n)
        if use_gpu and gpus < n:
            raise ConfigError(f"num_workers={n} with use_gpu=True needs {n} GPUs but the cluster has {gpus:g}; "
                              f"set num_workers: {int(gpus)} (one worker per GPU) or use_gpu: auto")
        need = n * self.cpus_per_worker
        if need > cpus + 1e-9:
            fit = int(cpus // self.cpus_per_worker)
            raise ConfigError(
                f"num_workers={n} x cpus_per_worker={self.cpus_per_worker:g} needs {need:g} CPUs but the cluster "
                f"has {cpus:g}, so the job would wait forever; set num_workers <= {max(fit, 1)}"
                + (f" or cpus_per_worker <= {cpus / n:g}" if cpus > 0 else ""))
        res: Dict[str, float] = {"CPU": float(self.cpus_per_worker)}
        if use_gpu:
            res["GPU"] = 1.0
        return WorkerPlan(n, use_gpu, res, max(1, int(self.cpus_per_worker)))
