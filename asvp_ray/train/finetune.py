"""Distributed fine-tuning on the labelled set with Ray Train (DDP): linear probe, FT, LP-FT.

Where it runs: a ``TorchTrainer`` worker group, gloo on CPU workers (float32), NCCL on GPU
workers with the mixed precision ``train.amp`` resolves to on the worker's card (bf16 on compute
capability >= 8.0, else fp16 with a ``GradScaler``; ``asvp_ray.runtime.device``), channels-last
tensors and cuDNN autotuning.

How the images get there: through Ray Data, decoded into the object store before the worker
group starts, each rank iterating its shard (:mod:`asvp_ray.train.dataset`).

Determinism: shuffling and augmentation are seeded by (``train.seed``, epoch, rank), the
augmentation per batch from its first id rather than from global random state, so with one
worker the same call trains the same model. With several workers, which blocks each rank reads
can vary between runs.

Failure and restart: every ``checkpoint_every`` epochs (and after the last) rank 0 reports a
Ray Train checkpoint holding the model, optimizer, scheduler, epoch, history and the best model
so far. When a worker dies, Ray Train restarts the worker group (``FailureConfig.max_failures``)
and the train function resumes from the latest registered checkpoint at the next epoch. The
run's name is a fingerprint of its inputs, so re-running the same call after the driver itself
died also resumes from the stored checkpoints.

Where: ``out_dir`` is a local folder or a URI on object storage (the run's ``storage``); Ray
Train's checkpoints go to ``out_dir/ray/<name>`` there (``RunConfig(storage_path=...,
storage_filesystem=...)``), the model file to ``out_dir/model.pt``, and the checkpoints are
removed once the model file is written.

The kept model (last, or best by eval accuracy) is written as one ``.pt`` file that
``create_backbone(spec, checkpoint=path)`` loads (it reads the ``backbone`` key); its ``head``
key scores the pool through :func:`asvp_ray.features.extract.predict_proba`. The file's format
belongs to :mod:`asvp_ray.features.model_file`.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from asvp_ray.core.errors import BadInputError, ConfigError
from asvp_ray.features.backbones import BackboneSpec, Preprocessor, create_backbone, data_config
from asvp_ray.features.model_file import save_model_file
from asvp_ray.storage.locations import delete_prefix, is_uri, resolve_uri
from asvp_ray.runtime.ray_utils import asvp_errors_unwrapped
from asvp_ray.runtime.resources import check_nested
from asvp_ray.train.config import TrainConfig
from asvp_ray.train.dataset import Collate, check_labels, ingest_config, labelled_dataset

log = logging.getLogger(__name__)

METHODS = ("linear_probe", "ft", "lpft")
_STATE_FILE = "state.pt"
_EVAL_BATCH = 256


@dataclass
class FinetuneResult:
    """What a fine-tuning job produced.

    Attributes:
        checkpoint: path (or URI) of the kept model file (``backbone``, ``head``, ``num_classes``,
            ``spec``, ``method``, ``epochs`` ...); loads with ``create_backbone(spec, checkpoint=...)``.
        test_accuracy: accuracy of the kept model on the eval set, when one was given.
        seconds: wall seconds of the whole call (reading the images, training, checkpoint copy).
        history: one dict per epoch (epoch, phase, lr, train_loss, train_accuracy,
            eval_accuracy, seconds, train_seconds, images (all ranks), images_per_s (all ranks),
            param_checksums: (sum, sum of squares) of the parameters on each rank).
        worker_nodes: Ray node id of each rank (of the attempt that finished).
        method: linear_probe, ft or lpft.
        kept_epoch: the epoch (0-based) whose weights were kept.
        resumed_from: the epochs at which the worker group resumed from a checkpoint after a
            failure (empty when nothing failed).
        precision: what the workers computed in: fp32 (CPU, or ``amp: off``), bf16 or fp16.
    """

    checkpoint: str
    test_accuracy: Optional[float]
    seconds: float
    history: List[Dict[str, Any]]
    worker_nodes: List[str]
    method: str = "ft"
    kept_epoch: int = -1
    resumed_from: List[int] = field(default_factory=list)
    precision: str = "fp32"


# --------------------------------------------------------------------------- model
class Classifier(nn.Module):
    """A pooled-feature backbone and a linear head."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def feature_width(backbone: nn.Module) -> int:
    """Width of the backbone's pooled features (timm's ``head_hidden_size`` where the model has
    a pre-logits layer, else ``num_features``)."""
    width = getattr(backbone, "head_hidden_size", None) or getattr(backbone, "num_features", None)
    if not width:
        raise ConfigError(f"backbone {type(backbone).__name__} does not say its feature width "
                          "(num_features); use a timm model")
    return int(width)


def build_classifier(spec: BackboneSpec, num_classes: int, init_checkpoint: Optional[str] = None,
                     seed: int = 0) -> Classifier:
    """The backbone (``create_backbone``) plus a new ``nn.Linear`` head seeded by ``seed``.

    Only the backbone comes from ``init_checkpoint``; the head always starts fresh.
    """
    backbone = create_backbone(spec, init_checkpoint)
    gen = torch.Generator().manual_seed(int(seed))
    head = nn.Linear(feature_width(backbone), int(num_classes))
    bound = 1.0 / math.sqrt(head.in_features)  # nn.Linear's own init, from a private generator
    with torch.no_grad():
        head.weight.uniform_(-bound, bound, generator=gen)
        head.bias.uniform_(-bound, bound, generator=gen)
    return Classifier(backbone, head)


# --------------------------------------------------------------------------- training pieces
def _milestones(epochs: int) -> List[int]:
    """Epochs (within a phase) after which the lr is multiplied by 0.1: 60% and 80%."""
    return sorted({max(1, int(round(0.6 * epochs))), max(1, int(round(0.8 * epochs)))})


def _optimizer(model: Classifier, phase: str, cfg: TrainConfig, phase_epochs: int):
    """SGD with momentum and the MultiStep schedule for one phase; freezes what the phase keeps fixed."""
    if phase == "lp":
        model.backbone.requires_grad_(False)
        groups = [{"params": list(model.head.parameters()), "lr": cfg.lp_lr}]
    else:
        model.backbone.requires_grad_(True)
        groups = [{"params": list(model.backbone.parameters()), "lr": cfg.backbone_lr},
                  {"params": list(model.head.parameters()), "lr": cfg.head_lr}]
    model.head.requires_grad_(True)
    opt = torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=_milestones(phase_epochs), gamma=0.1)
    return opt, sched


def _set_mode(model: Classifier, phase: str, freeze_bn: bool = False) -> None:
    model.train()
    if phase == "lp":
        model.backbone.eval()  # a linear probe reads fixed features: BatchNorm statistics stay put
    elif freeze_bn:
        for m in model.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()  # running statistics fixed; the affine weights still train


def _precision_of(amp: Union[bool, str]) -> str:
    """A precision name; ``True``/``False`` (older callers) mean bf16/fp32."""
    if isinstance(amp, bool):
        return "bf16" if amp else "fp32"
    return amp


def _train_epoch(net: nn.Module, loader, opt, device: torch.device, amp: Union[bool, str] = False,
                 scaler: Optional["torch.amp.GradScaler"] = None,
                 prep: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """One pass over ``loader``; returns summed loss, correct and seen counts (device tensors).

    Args:
        amp: the precision (``fp32``, ``bf16``, ``fp16``; a bool means bf16 or fp32).
        scaler: the fp16 loss scaler (None: unscaled steps).
        prep: turns a uint8 batch on the device into the model's input (device-side preprocessing).
    """
    from asvp_ray.runtime.device import autocast

    precision = _precision_of(amp)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if x.dtype == torch.uint8 and prep is not None:
            x = prep(x)
        elif device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(precision if device.type == "cuda" else "fp32"):
            logits = net(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
    return {"loss_sum": loss_sum, "correct": correct, "seen": seen}


@torch.no_grad()
def _evaluate(model: nn.Module, shard, pre: Preprocessor, device: torch.device,
              amp: Union[bool, str]) -> Tuple[int, int]:
    """(correct, total) on this rank's share of the eval set.

    Args:
        shard: this rank's ``DataIterator`` over rows ``{"image", "label"}`` (or any iterable of
            such numpy batches).
        pre: a ``Preprocessor`` (host) or an ``asvp_ray.runtime.device.DevicePreprocessor``.
    """
    from asvp_ray.runtime.device import autocast

    precision = _precision_of(amp) if device.type == "cuda" else "fp32"
    was_training = model.training
    model.eval()
    batches = shard.iter_batches(batch_size=_EVAL_BATCH, batch_format="numpy", prefetch_batches=1) \
        if hasattr(shard, "iter_batches") else shard
    correct, total = 0, 0
    for batch in batches:
        labels = np.asarray(batch["label"])
        x = pre(batch["image"]).to(device, non_blocking=True)
        with autocast(precision):
            pred = model(x).float().argmax(1).cpu().numpy()
        correct += int((pred == labels).sum())
        total += len(labels)
    model.train(was_training)
    return correct, total


def _checksum(model: nn.Module, device: torch.device) -> torch.Tensor:
    """(sum, sum of squares) of every parameter, in float64: equal on every DDP rank."""
    s = torch.zeros(2, dtype=torch.float64, device=device)
    for p in model.parameters():
        d = p.detach().double()
        s[0] += d.sum()
        s[1] += (d * d).sum()
    return s


def _cpu_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _to_cpu(obj: Any) -> Any:
    """``obj`` (a state dict, nested dicts/lists) with every tensor copied to the CPU, so that a
    checkpoint made on a GPU worker loads anywhere."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# --------------------------------------------------------------------------- the worker
def _quiet_report_lines() -> None:
    """Ray Train v2 logs each ``ray.train.report`` at INFO ("Reporting training result N:
    TrainingReport(...)", one console line per epoch and worker) under a logger named by its file
    path, outside ``ray.train`` where ``RunConfig(logging_config=...)`` would filter it. Raise that
    logger to WARNING in this worker; the epoch lines asvp-ray logs itself stay."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _train_worker(config: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Ray Train's per-worker function: build, resume, train the phases, checkpoint, report."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    _quiet_report_lines()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(config["torch_threads"]))
    cfg = TrainConfig(**config["cfg"])
    spec = BackboneSpec(**config["spec"])
    method, num_classes = config["method"], int(config["num_classes"])
    from asvp_ray.runtime.device import DevicePreprocessor, choose_precision, cuda_facts, match_tf32, tune_for_cuda

    from asvp_ray.runtime.faults import gpu_on_cpu

    device = ray.train.torch.get_device()
    if device.type == "cuda" and gpu_on_cpu():  # test-only: a rehearsal's fake GPU node has no card
        device = torch.device("cpu")
    facts: Dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives use the current device
        tune_for_cuda()
        facts = cuda_facts(device)
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    # Decided here, on the card this worker got; every rank must agree (a DDP step mixing bf16
    # and fp16 ranks would average gradients of different numerics).
    precision = choose_precision(cfg.amp, device.type, facts.get("capability"), facts.get("gpu", "this GPU"),
                                 key="train.amp")
    if distributed:
        every = [None] * world
        dist.all_gather_object(every, (precision, facts.get("gpu")))
        if len({p for p, _ in every}) > 1:
            raise ConfigError(f"train.amp={cfg.amp} resolves to different precisions on the workers' GPUs "
                              f"({sorted(set(map(tuple, every)))}); set train.amp: fp16 (or off), which every card runs")
    amp = precision
    match_tf32(precision, device.type)  # the model file's precision is what runs: fp32 without TF32
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    if rank == 0:
        log.info("fine-tuning on %s%s in %s", device, f" ({facts['gpu']}, capability "
                 f"{'.'.join(map(str, facts['capability']))})" if facts else "", precision)

    model = build_classifier(spec, num_classes, config["init_checkpoint"], seed=cfg.seed)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # cuDNN's fast layout for convolutions
    dcfg = data_config(spec, model.backbone)
    lp_epochs, ft_epochs = cfg.epochs_of(method)
    total = lp_epochs + ft_epochs

    start, history, resumes, best, state = 0, [], [], None, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, _STATE_FILE), map_location="cpu", weights_only=True)
        model.backbone.load_state_dict(state["backbone"])
        model.head.load_state_dict(state["head"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start = int(state["epoch"]) + 1
        history, best = list(state["history"]), state["best"]
        resumes = list(state["resumes"]) + [start]
        if rank == 0:
            log.warning("fine-tuning resumes at epoch %d from its checkpoint", start)

    node = ray.get_runtime_context().get_node_id()
    nodes = [node]
    if distributed:
        nodes = [None] * world
        dist.all_gather_object(nodes, node)

    on_gpu = device.type == "cuda"
    # Ray Data's prefetch threads collate (and augment) the next batches while this one trains;
    # on GPU workers the loader CPUs they reserved run that many threads.
    prefetch = max(1, int(config.get("loader_workers", cfg.loader_workers or 0)))
    train_shard = ray.train.get_dataset_shard("train")
    # The whole shard in the shuffle buffer: each epoch is a full permutation of this rank's rows
    # (the buffer holds block views of the object store, not copies).
    shuffle_rows = max(cfg.batch_size, -(-int(config["n_train"]) // world))
    has_eval = bool(config.get("has_eval"))
    eval_shard = ray.train.get_dataset_shard("eval") if has_eval else None
    eval_pre = DevicePreprocessor(Preprocessor(dcfg), device, channels_last=True) if on_gpu else Preprocessor(dcfg)
    train_prep = eval_pre if on_gpu else None

    net, phase, opt, sched = None, None, None, None
    for epoch in range(start, total):
        ep_phase = "lp" if epoch < lp_epochs else "ft"
        if ep_phase != phase:
            # A new phase changes which parameters train, and DDP registers its gradient hooks
            # at construction, so the model is wrapped again (the old wrapper is dropped first).
            net = None
            gc.collect()
            phase = ep_phase
            opt, sched = _optimizer(model, phase, cfg, lp_epochs if phase == "lp" else ft_epochs)
            net = ray.train.torch.prepare_model(model, move_to_device=device)  # the device chosen above
            if state is not None and state["phase"] == phase and int(state["epoch"]) + 1 == epoch:
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["scheduler"])
        # Shuffling and augmentation are seeded by (seed, epoch, rank): an epoch run again after a
        # restart draws what it drew the first time.
        epoch_seed = (cfg.seed * 1_000_003 + epoch * 7919 + rank) % 2**31
        torch.manual_seed(epoch_seed)
        collate = Collate(dcfg, cfg.augment, cfg.crop_scale, raw_uint8=on_gpu, seed=epoch_seed)
        loader = train_shard.iter_torch_batches(
            batch_size=cfg.batch_size, collate_fn=collate, device="cpu", pin_memory=on_gpu,
            prefetch_batches=prefetch, local_shuffle_buffer_size=shuffle_rows, local_shuffle_seed=epoch_seed)
        _set_mode(model, phase, cfg.freeze_bn)
        lr = float(opt.param_groups[-1]["lr"])
        t0 = time.perf_counter()
        sums = _train_epoch(net, loader, opt, device, amp, scaler=scaler, prep=train_prep)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_s = time.perf_counter() - t0
        sched.step()
        if distributed:
            for b in model.buffers():  # BatchNorm statistics: every rank keeps rank 0's
                dist.broadcast(b, 0)
        counts = torch.stack([sums["loss_sum"], sums["correct"].double(), sums["seen"].double()])
        last = epoch == total - 1
        eval_now = has_eval and (last or (cfg.eval_every > 0 and (epoch + 1) % cfg.eval_every == 0))
        if eval_now:
            c, t = _evaluate(model, eval_shard, eval_pre, device, amp)
            counts = torch.cat([counts, torch.tensor([c, t], dtype=torch.float64, device=device)])
        check = _checksum(model, device)
        if distributed:
            dist.all_reduce(counts)
            gathered = [torch.zeros_like(check) for _ in range(world)]
            dist.all_gather(gathered, check)
        else:
            gathered = [check]
        counts = counts.cpu().tolist()
        seen = max(counts[2], 1.0)
        metrics = {
            "epoch": epoch, "phase": phase, "lr": lr,
            "train_loss": counts[0] / seen, "train_accuracy": counts[1] / seen,
            "eval_accuracy": counts[3] / max(counts[4], 1.0) if eval_now else None,
            "seconds": round(time.perf_counter() - t0, 4), "train_seconds": round(train_s, 4),
            "images": int(counts[2]), "images_per_s": counts[2] / max(train_s, 1e-9),
            "param_checksums": [g.cpu().tolist() for g in gathered],
        }
        history.append(metrics)
        if cfg.keep == "best" and rank == 0 and (eval_now or not has_eval):
            score = metrics["eval_accuracy"] if has_eval else metrics["train_accuracy"]
            if best is None or score > best["score"]:
                best = {"epoch": epoch, "score": score, "backbone": _cpu_state(model.backbone),
                        "head": _cpu_state(model.head)}
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0 and ((epoch + 1) % cfg.checkpoint_every == 0 or last):
                torch.save({"backbone": _cpu_state(model.backbone), "head": _cpu_state(model.head),
                            "optimizer": _to_cpu(opt.state_dict()), "scheduler": sched.state_dict(), "phase": phase,
                            "epoch": epoch, "history": history, "resumes": resumes, "best": best,
                            "scaler": scaler.state_dict() if scaler is not None else None,
                            "precision": precision},
                           os.path.join(d, _STATE_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            report = {k: v for k, v in metrics.items() if k != "param_checksums" and v is not None}
            ray.train.report(report, checkpoint=checkpoint)
        hook = config.get("on_epoch_end")
        if hook is not None:
            hook(epoch, rank)
    if rank != 0:
        return None
    return {"history": history, "resumes": resumes, "worker_nodes": nodes, "precision": precision}


# --------------------------------------------------------------------------- the driver
def _fingerprint(**parts) -> str:
    h = hashlib.sha256()
    for k in sorted(parts):
        v = parts[k]
        h.update(k.encode())
        h.update(v.tobytes() if isinstance(v, np.ndarray) else json.dumps(v, sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


def finetune(source, ids, labels, num_classes: int, spec: BackboneSpec, cfg: TrainConfig,
             out_dir: Union[str, Path], *, method: str = "ft", init_checkpoint: Optional[str] = None,
             eval_source=None, eval_ids=None, eval_labels=None,
             on_epoch_end: Optional[Callable[[int, int], None]] = None) -> FinetuneResult:
    """Fine-tune backbone + linear head on a labelled set with Ray Train and keep one model file.

    Args:
        source: the ``PoolSource`` holding the labelled images.
        ids: int64 ids of the labelled images, shape (N,).
        labels: int class indices aligned to ``ids``, shape (N,); None: ``source.label_of(ids)``.
        num_classes: C, the head's width.
        spec: the backbone.
        cfg: the training settings.
        out_dir: where the kept model (``model.pt``) and, while running, Ray Train's checkpoints
            (``out_dir/ray/<name>``) go: a local folder, or a URI (``s3://bucket/prefix?options``,
            ``gs://...``) reached through ``pyarrow.fs`` (Ray Train's ``storage_filesystem``).
            A local folder must be on storage every node can reach when the cluster has several nodes.
        method: ``linear_probe`` (frozen backbone, train the head), ``ft`` (full fine-tuning) or
            ``lpft`` (linear probe, then full fine-tuning from that head).
        init_checkpoint: backbone weights to start from (default: ``spec.weights``); the head
            always starts fresh.
        eval_source, eval_ids, eval_labels: an optional held-out set, evaluated after the last epoch
            and every ``cfg.eval_every`` epochs
            (``eval_ids`` default: all of ``eval_source``; ``eval_labels`` default: its labels).
        on_epoch_end: called as ``fn(epoch, rank)`` in every worker after each epoch's report
            (for fault-injection tests and custom logging); must be picklable.

    Returns:
        a ``FinetuneResult``.

    Raises:
        ConfigError: an unknown method, a phase with no epochs, or more GPUs/CPUs than the cluster has.
        BadInputError: labels that do not fit the ids or ``num_classes``; unreadable images.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    if method not in METHODS:
        raise ConfigError(f"unknown fine-tuning method {method!r}; use one of {', '.join(METHODS)}")
    if int(num_classes) < 2:
        raise BadInputError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
    lp_epochs, ft_epochs = cfg.epochs_of(method)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or len(ids) == 0:
        raise BadInputError("finetune needs a non-empty 1-D array of labelled ids")
    if len(np.unique(ids)) != len(ids):
        raise BadInputError("finetune: the labelled ids hold duplicates; pass each id once")
    y = check_labels(source.label_of(ids) if labels is None else labels, len(ids), num_classes, "labelled set")
    plan = cfg.plan()
    create_backbone(spec, init_checkpoint)  # fails fast on a bad model name or weights file

    ev_ids, ev_y = None, None
    if eval_source is not None:
        ev_ids = eval_source.ids if eval_ids is None else np.asarray(eval_ids, dtype=np.int64)
        ev_y = check_labels(eval_source.label_of(ev_ids) if eval_labels is None else eval_labels, len(ev_ids),
                             num_classes, "eval set")
    # Images are read and decoded by Ray Data tasks into the object store, before the workers
    # take their CPUs; this process holds block references only.
    check_nested({"CPU": 1.0}, "the image-reading tasks of the fine-tune (Ray Data)",
                 "nothing here: give the calling process fewer CPUs", grace_s=1.0)
    datasets = {"train": labelled_dataset(source, ids, y, "labelled set")}
    if ev_ids is not None:
        datasets["eval"] = labelled_dataset(eval_source, ev_ids, ev_y, "eval set")

    if is_uri(out_dir):  # Ray Train reaches the storage through the same pyarrow filesystem (its
        # options and credentials stay in that object, never in a path Ray logs or records)
        out: Union[str, Path] = str(out_dir)
        storage_fs, out_path = resolve_uri(out)
        storage_path = f"{out_path}/ray"
    else:
        out = Path(out_dir).resolve()
        out.mkdir(parents=True, exist_ok=True)
        storage_fs, storage_path = None, str(out / "ray")
    name = f"finetune-{method}-" + _fingerprint(
        method=method, cfg=cfg.model_dump(mode="json"), spec=asdict(spec), num_classes=int(num_classes), ids=ids,
        labels=y, init=init_checkpoint, eval=ev_ids if ev_ids is not None else [])
    config = {"cfg": cfg.model_dump(mode="json"), "spec": asdict(spec), "method": method,
              "num_classes": int(num_classes), "init_checkpoint": init_checkpoint,
              "n_train": len(ids), "has_eval": "eval" in datasets,
              "torch_threads": plan.torch_threads, "loader_workers": plan.loader_workers,
              "on_epoch_end": on_epoch_end}
    from asvp_ray.runtime.faults import gpu_on_cpu
    from asvp_ray.runtime.placement import cpu_selector

    trainer = TorchTrainer(
        _train_worker, train_loop_config=config, datasets=datasets, dataset_config=ingest_config(),
        # test-only: a rehearsal's fake GPU workers have no CUDA, so no NCCL; they train on the CPU with gloo
        **({"torch_config": ray.train.torch.TorchConfig(backend="gloo")} if plan.use_gpu and gpu_on_cpu() else {}),
        scaling_config=ray.train.ScalingConfig(num_workers=plan.num_workers, use_gpu=plan.use_gpu,
                                               resources_per_worker=plan.resources_per_worker,
                                               # CPU workers stay off GPU nodes (GPU workers need one)
                                               label_selector=None if plan.use_gpu else cpu_selector()),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    check_nested({r: plan.num_workers * float(plan.resources_per_worker.get(r, 0.0)) for r in ("CPU", "GPU")},
                 "the Ray Train workers", "train.num_workers / train.cpus_per_worker / train.use_gpu")
    with asvp_errors_unwrapped():
        result = trainer.fit()
    if result.checkpoint is None:  # pragma: no cover - the last epoch always checkpoints
        raise RuntimeError(f"fine-tuning {name} finished without a checkpoint; see {storage_path}")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, _STATE_FILE), map_location="cpu", weights_only=True)
    ret = result.return_value or {}
    history = ret.get("history") or state["history"]
    kept = state["best"] if cfg.keep == "best" and state.get("best") else {
        "epoch": state["epoch"], "backbone": state["backbone"], "head": state["head"]}
    kept_epoch = int(kept["epoch"])
    total = lp_epochs + ft_epochs
    precision = ret.get("precision") or state.get("precision") or "fp32"
    final = {"backbone": kept["backbone"], "head": kept["head"], "num_classes": int(num_classes),
             "spec": asdict(spec), "method": method, "epochs": total, "epoch": kept_epoch,
             "lp_epochs": lp_epochs, "ft_epochs": ft_epochs, "precision": precision}
    path = save_model_file(out, **final)
    if storage_fs is None:
        shutil.rmtree(Path(storage_path) / name, ignore_errors=True)
    else:
        try:
            delete_prefix(storage_fs, f"{storage_path}/{name}")
        except OSError as e:  # a leftover only costs space; the model file is written
            log.warning("could not remove Ray Train's checkpoints %s/%s: %s", storage_path, name, e)
    row = next((h for h in history if h["epoch"] == kept_epoch), {})
    return FinetuneResult(
        checkpoint=path, test_accuracy=row.get("eval_accuracy"), seconds=round(time.perf_counter() - t0, 3),
        history=history, worker_nodes=list(ret.get("worker_nodes") or []), method=method, kept_epoch=kept_epoch,
        resumed_from=list(ret.get("resumes") or state.get("resumes") or []), precision=precision)
