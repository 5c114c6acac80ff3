"""The shared feature cache (the config's ``feature_cache``): features v0 keyed by what
determines them (backbone, weights, data, device, precision), reused by every run that asks for
the same. An entry is a feature store of one version; a run's v0 is made to appear there, or
there in a run, with hard links in a local folder, by copies (meta.json last) when either side
is on an object store.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import pyarrow.fs as pafs

from asvp_ray.core.errors import RunDirError
from asvp_ray.features.store import FeatureStore
from asvp_ray.storage.atomic import atomic_write_json, fsync_dir, json_default
from asvp_ray.storage.locations import is_uri, local_path, read_bytes, resolve_uri

# Version 2 of the feature-cache key adds the device and the precision (issue 19). Entries of
# version 1 (made before; their meta.json records neither) have other names and are never reused.
# Version 3: resized pixels are rounded and clipped to uint8 levels before normalisation (the read
# tasks resize, issue 13); features of resized images differ from version 2's, so those are not reused.
CACHE_KEY_VERSION = 3


def cache_key(meta_inputs: Dict[str, Any], *, device: str, precision: str) -> str:
    """A key naming features by what determines them: backbone spec, weights hash, sources, and
    the device and precision they are computed in (bf16 GPU features are not fp32 CPU features).

    Args:
        meta_inputs: the backbone spec, weights hash, sources (a JSON-able dict).
        device: ``cpu`` or ``cuda`` (``asvp_ray.features.extract.Compute.device``).
        precision: ``fp32``, ``bf16`` or ``fp16``.
    """
    inputs = {**meta_inputs, "cache_key_version": CACHE_KEY_VERSION, "device": device, "precision": precision}
    text = json.dumps(inputs, sort_keys=True, default=json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def check_cached_compute(meta: Dict[str, Any], device: str, precision: str, where: Path) -> None:
    """Refuse a cache entry whose meta.json says it was computed on another device or in another
    precision than its key promises (a copied or hand-made folder): never mix them silently.

    Raises:
        RunDirError: naming the entry, what it holds and the fix.
    """
    got = (meta.get("device"), meta.get("precision"))
    if got != (device, precision):
        raise RunDirError(f"feature cache entry {where} holds features computed on {got[0] or 'an unrecorded device'} "
                          f"in {got[1] or 'an unrecorded precision'}, but its key is for {device} in {precision}; "
                          "delete that folder and rerun")


def legacy_cache_entries(cache_root: Path) -> List[Path]:
    """Entries of a feature cache made before device and precision were part of the key (their
    v0/meta.json records no ``precision``); they are never reused."""
    out = []
    root = Path(cache_root)
    if not root.is_dir():
        return out
    for entry in sorted(root.iterdir()):
        meta = entry / "v0" / "meta.json"
        if meta.is_file():
            try:
                if "precision" not in json.loads(meta.read_text()):
                    out.append(entry)
            except (OSError, ValueError):
                continue
    return out


def link_version(src: Path, dst_store: FeatureStore, version: int,
                 meta_update: Optional[Dict[str, Any]] = None) -> Path:
    """Make ``src`` (a complete version folder) appear as ``version`` of ``dst_store``, with hard
    links where the file system allows (no copy of the data), atomically. When either side is on
    an object store, the parts are copied instead (:func:`_copy_version`).

    Args:
        meta_update: keys to set in the new copy's ``meta.json`` (written as a file of its own,
            so ``src``'s stays as it was), e.g. the ``cost`` the run that made it was charged.
    """
    if dst_store.remote or is_uri(src):
        return _copy_version(src, dst_store, version, meta_update)
    dst_store.root.mkdir(parents=True, exist_ok=True)
    tmp = dst_store.root / f".v{version}.partial-{uuid.uuid4().hex[:8]}"

    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, tmp, copy_function=link)
    if meta_update:
        meta = json.loads((tmp / "meta.json").read_text())
        meta.update(meta_update)
        (tmp / "meta.json").unlink()  # a hard link to src's: do not write through it
        atomic_write_json(tmp / "meta.json", meta)
    os.rename(tmp, dst_store.path(version))
    fsync_dir(dst_store.root)
    return dst_store.path(version)


def _copy_version(src: Union[Path, str], dst_store: FeatureStore, version: int,
                  meta_update: Optional[Dict[str, Any]] = None) -> Union[Path, str]:
    """Copy a complete version between a local folder and an object store (the feature cache is
    local; a run's store may be in a bucket): the parts meta.json lists first, then meta.json,
    committed the destination's way (a local partial folder renamed into place; on an object
    store, meta.json last in one PUT). A failed copy leaves nothing readable.

    Raises:
        RunDirError: ``src`` lists no parts (written by an older asvp-ray), or ``version`` exists.
    """
    if is_uri(src):
        src_fs, src_dir = resolve_uri(str(src))
    else:
        src_fs, src_dir = pafs.LocalFileSystem(), str(local_path(src))
    meta = json.loads(read_bytes(src_fs, f"{src_dir}/meta.json"))
    if "parts" not in meta:
        raise RunDirError(f"feature version {src} lists no parts in its meta.json (written by an older asvp-ray); "
                          "delete it and rerun to extract it again")
    meta.update(meta_update or {})
    data = (json.dumps(meta, indent=2, default=json_default) + "\n").encode()
    backend = dst_store.backend
    backend.prepare_copy(version)
    staging = backend.begin(version)
    try:
        for p in meta["parts"]:
            backend.copy_part(src_fs, f"{src_dir}/{p['file']}", staging, version, p["file"])
        return backend.commit_copy(staging, version, data)
    except BaseException:
        backend.abort(staging, version)
        raise
