"""Distributed feature extraction: Ray Data ``map_batches`` over an actor pool.

Each actor loads the backbone once (GPU actors where the cluster has GPUs, CPU actors otherwise)
and turns batches of decoded images into pooled features. ``extract_to_store`` adds a write stage:
Ray Data tasks gather the actors' rows into Parquet parts of about ``store.PART_BYTES`` and write
them straight into the version's partial folder, or under the version's prefix on an object store
(``store.write_part``). The driver receives one
small record per part (file, rows, size, sha256) and the skipped images, never a feature, shows
a progress bar (images done, images/s, ETA), and commits meta.json once every part is there.

Device, precision and the actor pool's size are planned in :mod:`asvp_ray.features.extract_plan`
(``plan_actors``, ``resolve_compute``); every actor checks that its own card computes in the
planned precision. Both are recorded in meta.json and name the feature cache entry.

Preprocessing: the read tasks decode each image and resize and centre-crop it to the backbone's
input size, uint8 (``Preprocessor.fit``, a Ray Data stage fused with the read), so the CPU work
spreads over the read tasks of every node and the actors receive one (B, S, S, 3) uint8 array per
batch; the actors only normalise (GPU actors upload from pinned memory and normalise on the
device, in channels-last layout with cuDNN autotuning). The input size comes from the
architecture built on PyTorch's meta device (``input_config``); each actor checks that its
loaded model agrees.
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import asdict
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from asvp_ray.runtime.faults import fault_env, fault_point, gpu_on_cpu
from asvp_ray.core.errors import AsvpError, BadInputError, ConfigError
from asvp_ray.features.backbones import (BackboneSpec, Preprocessor, backbone_architecture, backbone_weights_hash,
                                        create_backbone, data_config, input_config)
from asvp_ray.features.extract_plan import ActorPlan, Compute, plan_actors, resolve_compute, wait_for_actors
from asvp_ray.features.model_file import load_head
from asvp_ray.features.store import POOL, FeatureStore
from asvp_ray.runtime.ray_utils import asvp_errors_unwrapped
from asvp_ray.runtime.resources import check_nested

log = logging.getLogger(__name__)


class FeatureExtractor:
    """The actor-side callable: one model load per actor, then ``__call__`` per batch.

    Args:
        spec: ``BackboneSpec`` fields as a dict.
        checkpoint: fine-tuned weights overriding the spec's (feature refresh).
        torch_threads: intra-op threads for this actor.
        device: ``cpu`` or ``cuda``.
        amp: the ``extract.amp`` setting (``auto|off|bf16|fp16``; a bool of older callers).
        with_head: also apply the checkpoint's linear head (a ``finetune`` model file) and output
            class probabilities in a ``probs`` column (float32, (B, C)).
        precision: the precision the driver resolved (``resolve_compute``); the actor checks
            that its own card resolves ``amp`` to the same (None: use its own choice).
        input_cfg: the preprocessing the read tasks applied (``input_config``: they resized the
            images to the input size, uint8, with ``Preprocessor.fit``); the actor only
            normalises. None: batches arrive at any size and the actor resizes them.

    Raises:
        ConfigError: this actor's GPU resolves ``amp`` to another precision than ``precision``
            (GPUs of different generations in one pool), or bf16 on a pre-Ampere card.
        AsvpError: the loaded model's preprocessing differs from ``input_cfg``.
    """

    def __init__(self, spec: Dict[str, Any], checkpoint: Optional[str], torch_threads: int, device: str,
                 amp: Any = "auto", with_head: bool = False, precision: Optional[str] = None,
                 input_cfg: Optional[Dict[str, Any]] = None):
        import torch

        from asvp_ray.runtime.device import DevicePreprocessor, choose_precision, cuda_facts, match_tf32, tune_for_cuda

        torch.set_num_threads(int(torch_threads))
        self.spec = BackboneSpec(**spec)
        if device == "cuda" and gpu_on_cpu():  # test-only: a rehearsal's fake GPU node has no card
            device = "cpu"
        self.device = device
        facts = cuda_facts() if device == "cuda" else {}
        own = choose_precision(amp, device, facts.get("capability"), facts.get("gpu", "this GPU"), key="extract.amp")
        if precision is not None and own != precision:
            raise ConfigError(
                f"extract.amp={amp}: this actor's GPU ({facts.get('gpu')}, capability "
                f"{'.'.join(map(str, facts.get('capability') or []))}) computes in {own} but the extraction was "
                f"planned in {precision} (GPUs of different generations); set extract.amp to fp16 or off, which "
                "every card runs, so that one feature version is not computed in two precisions")
        self.precision = own
        self.model = create_backbone(self.spec, checkpoint).to(device)
        own_cfg = data_config(self.spec, self.model)
        if input_cfg is not None and _comparable(own_cfg) != _comparable(input_cfg):
            raise AsvpError(f"backbone {self.spec.name}: the loaded model's preprocessing {own_cfg} differs from "
                            f"the one the read tasks resized for {input_cfg}; report this as a bug")
        self.pre = Preprocessor(own_cfg)
        if device == "cuda":
            tune_for_cuda()
            match_tf32(self.precision, device)  # meta.json's precision is what runs: fp32 without TF32
            self.model = self.model.to(memory_format=torch.channels_last)
        if device == "cuda" or input_cfg is not None:
            self.pre = DevicePreprocessor(self.pre, device, channels_last=device == "cuda",
                                          resize=input_cfg is None)
        self.head = None
        if with_head:
            if checkpoint is None:
                raise BadInputError("class probabilities need a fine-tuned model file (checkpoint=...) with a head")
            self.head = load_head(checkpoint).to(device)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import torch

        from asvp_ray.runtime.device import autocast

        self._batches = getattr(self, "_batches", 0) + 1
        fault_point(f"extract_actor:batch{self._batches}")
        ids = np.asarray(batch["id"], dtype=np.int64)
        errors = np.asarray(batch["error"], dtype=object)
        ok = errors == ""
        images = batch["image"]
        feats = None
        probs = None
        if ok.any():
            imgs = images[ok] if not ok.all() else images
            x = self.pre(imgs).to(self.device, non_blocking=True)
            with torch.inference_mode(), autocast(self.precision):
                f = self.model(x)
            if self.head is not None:
                with torch.inference_mode():  # the head in float32: probabilities feed margins
                    p = torch.softmax(self.head(f.float()), dim=1).cpu().numpy()
                probs = np.zeros((len(ids), p.shape[1]), dtype=np.float32)
                probs[ok] = p
            f = f.float().cpu().numpy()
            feats = np.zeros((len(ids), f.shape[1]), dtype=np.float32)
            feats[ok] = f
        else:
            feats = np.zeros((len(ids), 1), dtype=np.float32)
            if self.head is not None:
                probs = np.zeros((len(ids), self.head.out_features), dtype=np.float32)
        out = {"id": ids, "feature": feats, "error": errors}
        if "split" in batch:  # one job over the pool and the test set: the split travels with its rows
            out["split"] = np.asarray(batch["split"])
        if probs is not None:
            out["probs"] = probs
        return out


def _comparable(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """A data config's fields as JSON would give them back (tuples as lists, as in a Ray argument)."""
    return json.loads(json.dumps(cfg))


# One Preprocessor per read worker process and input config (``_fit_images``).
_FITTERS: Dict[str, Preprocessor] = {}


def _fit_images(batch: Dict[str, np.ndarray], input_cfg: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Ray Data task, fused with the read and decode: the block's images at the model's input
    size, uint8 (``Preprocessor.fit``), so the actors get one (B, S, S, 3) array per batch."""
    key = json.dumps(input_cfg, sort_keys=True)
    pre = _FITTERS.get(key)
    if pre is None:
        pre = _FITTERS[key] = Preprocessor(input_cfg)
    # one (B,H,W[,C]) array, or decoded files of any size (unreadable rows hold a 1x1 placeholder)
    batch["image"] = pre.fit(batch["image"])
    return batch


# CPUs of one write task: it encodes and writes a part, mostly I/O; a small share lets it run next
# to the read tasks in the CPU the actor plan leaves free.
WRITE_TASK_CPUS = 0.25


def _tag_split(batch: Dict[str, np.ndarray], split: str) -> Dict[str, np.ndarray]:
    """Ray Data task (fused with the decode): mark a source's rows with the split they belong to."""
    batch["split"] = np.full(len(batch["id"]), split, dtype=object)
    return batch


def _write_features(batch: Dict[str, np.ndarray], folders: Dict[str, str]) -> Dict[str, np.ndarray]:
    """Ray Data write task: per split in the batch, the rows read without error become one part
    in that split's folder.

    Returns:
        one row per split present: ``split``, the part's record (``store.write_part``; ``file``
        empty when no row was readable) and ``skipped``, a JSON list of ``[id, reason]``.
    """
    from asvp_ray.features.parts import write_part

    ids = np.asarray(batch["id"], dtype=np.int64)
    errors = np.asarray(batch["error"], dtype=object)
    splits = np.asarray(batch["split"], dtype=object)
    feats_all = batch["feature"]
    rows: List[Dict[str, Any]] = []
    for split in sorted(set(splits.tolist())):
        ok = (errors == "") & (splits == split)
        bad = (errors != "") & (splits == split)
        rec: Dict[str, Any] = {"file": "", "rows": 0, "dim": 0, "bytes": 0, "sha256": "", "min_id": 0}
        if ok.any():
            if feats_all.dtype == object:  # some rows unreadable: (B, 1) zeros next to (B, D) rows, ragged
                feats = np.stack([np.asarray(f, dtype=np.float32) for f in feats_all[ok]])
            else:
                feats = feats_all[ok]
            rec = write_part(folders[split], ids[ok], np.asarray(feats, dtype=np.float32))
        rec["split"] = split
        rec["skipped"] = json.dumps([[int(i), str(m)] for i, m in zip(ids[bad], errors[bad])])
        rows.append(rec)
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def _actor_stage(ds, plan: ActorPlan, spec: BackboneSpec, checkpoint: Optional[str], cfg, with_head: bool,
                 compute: Compute, input_cfg: Dict[str, Any]):
    """The extraction's actor-pool stage (``FeatureExtractor``) on ``ds``."""
    from ray.data import ActorPoolStrategy

    from asvp_ray.runtime.placement import gpu_actor_selector

    gpu_sel = gpu_actor_selector() if plan.device == "cuda" else None
    return ds.map_batches(
        FeatureExtractor,
        fn_constructor_kwargs=dict(spec=asdict(spec), checkpoint=checkpoint, torch_threads=plan.torch_threads,
                                   device=plan.device, amp=cfg.amp, with_head=with_head,
                                   precision=compute.precision, input_cfg=input_cfg),
        batch_size=cfg.batch_size,
        compute=ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
        **({"resources": plan.resources} if plan.resources else {}),
        # GPU actors leave the pipeline's CPU-only label selector (placement.apply_to_ray_data)
        **({"label_selector": gpu_sel} if gpu_sel else {}),
        batch_format="numpy",
        # Ray Data's own default for actors, given explicitly: Ray Data fuses task stages into a
        # following actor stage whose remote arguments are equal, which would move the decode and
        # the resize into the actors; with this they stay fused with the read tasks.
        scheduling_strategy="SPREAD",
        runtime_env={"env_vars": fault_env()} if fault_env() else None,
        # Ray Data's actor pools restart a dead actor and retry its batches by default
        # (max_restarts=-1, max_task_retries=-1), so a lost extraction worker costs only its batch.
    )


def extract(source, spec: BackboneSpec, cfg, *, ids: Optional[np.ndarray] = None, checkpoint: Optional[str] = None,
            skip_unreadable: bool = False, on_rows: Optional[Callable[[int], None]] = None,
            with_head: bool = False, compute: Optional[Compute] = None,
            write_to: Optional[Dict[str, str]] = None, part_rows: int = 16_384) -> Iterator[Tuple]:
    """Stream features of a source's images through the actor pool.

    Args:
        source: a ``PoolSource``; with ``write_to``, a mapping split -> ``PoolSource`` (the pool
            and the test set go through one dataset and one actor pool, so the actors and their
            model load are paid once per version).
        spec: the backbone.
        cfg: an ``ExtractConfig``.
        ids: only these ids (default: all of the source).
        checkpoint: fine-tuned backbone weights (feature refresh).
        skip_unreadable: report unreadable images instead of failing.
        on_rows: called with the number of rows finished after each batch (progress).
        with_head: also score with the head of ``checkpoint`` (a ``finetune`` model file).
        compute: the device and precision (default: ``resolve_compute(cfg)``).
        write_to: split -> folder or object-store URI (storage every node sees): Ray Data tasks write each split's
            features there as Parquet parts of up to ``part_rows`` rows (``store.write_part``) and
            only their records come back.
        part_rows: rows per part with ``write_to``.

    Yields:
        (ids int64 (B,), features float32 (B, D), skipped [(id, reason)]) per batch, in any order;
        with ``with_head``, a fourth item: class probabilities float32 (B, C). With ``write_to``:
        (record, skipped) per part written, the record as ``store.write_part`` returns it plus
        its ``split``.

    Raises:
        BadInputError: an unreadable image (unless skipped), naming its id and path.
    """
    if write_to is not None and ids is not None:
        raise ValueError("extract(write_to=...) writes whole sources; ids would select from the pool and the test "
                         "set alike: pass sources that hold only the rows to write")
    plan = plan_actors(cfg)
    wait_for_actors(cfg, plan)
    compute = compute or resolve_compute(cfg, plan)
    if compute.device != plan.device:
        raise ConfigError(f"the extraction was planned on {compute.device} but the cluster now gives {plan.device} "
                          "actors (its GPUs changed); rerun, or set extract.device explicitly")
    log.info("extraction plan: %d to %d %s actor(s) x {CPU: %g, GPU: %g%s}, %d torch thread(s), precision %s (%s)",
             plan.min_actors, plan.max_actors, plan.device, plan.num_cpus, plan.num_gpus,
             "".join(f", {k}: {v:g}" for k, v in plan.resources.items()), plan.torch_threads, compute.precision,
             plan.why)
    check_nested({"CPU": plan.min_actors * plan.num_cpus + 1.0, "GPU": plan.min_actors * plan.num_gpus},
                 "the extraction actors and a read task", "extract.min_actors / extract.num_cpus_per_actor")
    from asvp_ray.runtime.placement import apply_to_ray_data

    apply_to_ray_data()  # read, decode and write tasks (and CPU actors) stay off GPU nodes
    # the read tasks resize to the input size (uint8); the actors only normalise and compute
    input_cfg = _comparable(input_config(spec))

    def read(src, split: Optional[str] = None):
        d = src.to_dataset(ids=ids, skip_unreadable=skip_unreadable)
        if split is not None:
            d = d.map_batches(_tag_split, fn_kwargs={"split": split}, batch_size=None, batch_format="numpy")
        return d.map_batches(_fit_images, fn_kwargs={"input_cfg": input_cfg}, batch_size=None, batch_format="numpy")

    if write_to is not None:
        tagged = [read(src, split) for split, src in source.items()]
        ds = tagged[0].union(*tagged[1:]) if len(tagged) > 1 else tagged[0]
    else:
        ds = read(source)
    with warnings.catch_warnings():
        # scheduling_strategy is a plain Ray remote argument, which Ray 2.60 marks deprecated
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        ds = _actor_stage(ds, plan, spec, checkpoint, cfg, with_head, compute, input_cfg)
    if write_to is not None:
        yield from _written_parts(ds, {k: str(v) for k, v in write_to.items()}, part_rows, on_rows)
        return
    with asvp_errors_unwrapped():
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            b_ids = np.asarray(batch["id"], dtype=np.int64)
            errs = np.asarray(batch["error"], dtype=object)
            ok = errs == ""
            skipped = [(int(i), str(m)) for i, m in zip(b_ids[~ok], errs[~ok])]
            feats = np.asarray(batch["feature"], dtype=np.float32)
            if on_rows is not None:
                on_rows(len(b_ids))
            if with_head:
                yield b_ids[ok], feats[ok], skipped, np.asarray(batch["probs"], dtype=np.float32)[ok]
            else:
                yield b_ids[ok], feats[ok], skipped


def _written_parts(ds, folders: Dict[str, str], part_rows: int,
                   on_rows: Optional[Callable[[int], None]]) -> Iterator[Tuple]:
    """Add the write stage to the extraction dataset; yield (record, skipped) per part."""
    ds = ds.map_batches(_write_features, fn_kwargs={"folders": folders}, batch_size=int(part_rows),
                        num_cpus=WRITE_TASK_CPUS, batch_format="numpy")
    with asvp_errors_unwrapped():
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for k in range(len(batch["file"])):
                rec = {key: batch[key][k] for key in ("file", "rows", "dim", "bytes", "sha256", "min_id", "split")}
                rec = {key: (str(v) if key in ("file", "sha256", "split") else int(v)) for key, v in rec.items()}
                skipped = [(int(i), str(m)) for i, m in json.loads(str(batch["skipped"][k]))]
                if on_rows is not None:
                    on_rows(rec["rows"] + len(skipped))
                yield rec, skipped


class _Progress:
    """Images done, images/s and ETA. Inside a Ray actor (the run driver) it uses Ray's tqdm,
    which the driver process renders as one clean bar."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if not enabled or os.environ.get("TQDM_DISABLE") == "1":
            return
        import ray

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            from ray.experimental import tqdm_ray

            self.bar = tqdm_ray.tqdm(total=total, desc=desc, unit="img")
        else:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="img", unit_scale=True, dynamic_ncols=True,
                            smoothing=0.1, mininterval=0.5)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def extract_to_store(store: FeatureStore, version: int, pool, spec: BackboneSpec, cfg, *, test=None,
                     checkpoint: Optional[str] = None, skip_unreadable: bool = False,
                     extra_meta: Optional[Dict[str, Any]] = None, progress: Optional[bool] = None,
                     compute: Optional[Compute] = None, part_rows: Optional[int] = None) -> Dict[str, Any]:
    """Extract the pool (and the test source) into feature version ``version`` atomically.

    Ray Data tasks write the features into the version's partial folder; this process receives
    each part's record (rows, bytes, sha256) and the skipped images, checks that every image is
    accounted for, and commits meta.json (listing the parts and their checksums) last. A crash
    before that leaves only a partial folder, which no reader lists and the next writer removes.

    ``compute`` (default: ``resolve_compute(cfg)``) is recorded in meta.json: ``device``,
    ``precision``, ``amp``, ``gpu``, ``capability``.

    Args:
        part_rows: rows per Parquet part (default: about ``store.PART_BYTES`` of features).

    Returns:
        the version's metadata (what meta.json holds), with ``seconds`` of wall time.

    Raises:
        BadInputError: an unreadable image (unless skipped), NaN or infinite features.
        AsvpError: the parts written do not account for every image (nothing is committed).
    """
    from asvp_ray.features.parts import rows_per_part

    t0 = time.perf_counter()
    # Fails fast on a bad name or weights, before any Ray work; the driver builds no weights for it
    # where they come from a file (backbone_weights_hash), only the architecture on the meta device.
    hashed = backbone_weights_hash(spec, checkpoint)
    model = backbone_architecture(spec)
    compute = compute or resolve_compute(cfg)
    meta = {
        "backbone": spec.name,
        "weights": checkpoint or spec.resolved_weights(),
        "weights_hash": hashed,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config(spec, model).items()},
        "backbone_spec": asdict(spec),
        "pool_source": pool.describe(),
        "test_source": test.describe() if test is not None else None,
        **compute.to_meta(),
        **(extra_meta or {}),
    }
    part_rows = part_rows or rows_per_part(getattr(model, "head_hidden_size", None) or
                                           getattr(model, "num_features", 1280))
    del model
    show = cfg.progress if progress is None else progress
    skipped: List[Tuple[str, int, str]] = []
    sources = {POOL: pool, **({"test": test} if test is not None else {})}
    with store.writer(version, meta) as w:
        folders = {split: str(w.folder(split)) for split in sources}
        bar = _Progress(sum(len(src) for src in sources.values()),
                        f"features v{version} ({' + '.join(sources)})", show)
        n_skipped = {split: 0 for split in sources}
        try:  # one dataset and one actor pool for both splits: the actors start and load the model once
            for rec, sk in extract(sources, spec, cfg, checkpoint=checkpoint, skip_unreadable=skip_unreadable,
                                   on_rows=bar, compute=compute, write_to=folders, part_rows=part_rows):
                split = rec.pop("split")
                if rec["rows"]:
                    w.add_part(rec, split)
                skipped += [(split, i, m) for i, m in sk]
                n_skipped[split] += len(sk)
        finally:
            bar.close()
        for split, src in sources.items():
            written = w.splits[split].rows
            if written + n_skipped[split] != len(src):  # a lost or doubled part: never commit it
                raise AsvpError(f"extracting features v{version} ({split}): the workers wrote {written} rows and "
                                f"skipped {n_skipped[split]} of {len(src)} images; nothing was committed, rerun")
        w.meta["skipped"] = [{"split": s, "id": i, "reason": m} for s, i, m in sorted(skipped)]
        w.meta["seconds"] = round(time.perf_counter() - t0, 3)
        w.commit()
    if skipped:
        log.warning("skipped %d unreadable image(s); their ids are listed in %s", len(skipped),
                    store.location(version, "meta.json"))
    return store.meta(version)


def predict_proba(source, ids, checkpoint: str, spec: BackboneSpec, extract_cfg, *, skip_unreadable: bool = False,
                  return_features: bool = False):
    """Class probabilities of ``ids`` from a fine-tuned backbone + head, through the Ray Data
    actor pool used for feature extraction (standard AL scores the pool this way).

    Args:
        source: a ``PoolSource``.
        ids: ids to score (None: the whole source).
        checkpoint: a model file written by ``finetune``.
        spec: the backbone spec the model was trained with.
        extract_cfg: an ``ExtractConfig`` (actor pool sizing, batch size, device).
        skip_unreadable: leave unreadable images out instead of failing.
        return_features: also return the pooled features.

    Returns:
        (ids int64 (N,) ascending, probs float32 (N, C)), plus features float32 (N, D) when
        ``return_features``.

    Raises:
        BadInputError: the checkpoint has no head; an unreadable image (unless skipped).
    """
    load_head(checkpoint)  # fails fast, before any Ray work
    all_ids, all_p, all_f = [], [], []
    for b_ids, feats, _skipped, probs in extract(source, spec, extract_cfg, ids=ids, checkpoint=checkpoint,
                                                 skip_unreadable=skip_unreadable, with_head=True):
        all_ids.append(b_ids)
        all_p.append(probs)
        if return_features:
            all_f.append(feats)
    if not all_ids:
        empty = (np.zeros(0, np.int64), np.zeros((0, 0), np.float32))
        return empty + ((np.zeros((0, 0), np.float32),) if return_features else ())
    out_ids = np.concatenate(all_ids)
    order = np.argsort(out_ids, kind="stable")
    res = (out_ids[order], np.concatenate(all_p)[order])
    if return_features:
        res = res + (np.concatenate(all_f)[order],)
    return res
