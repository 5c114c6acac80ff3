"""The run directory: what a run has done, written so that it explains itself and survives a crash.

Layout::

    DIR/config.yaml        the resolved config (what produced this run)
    DIR/summary.json       method, pool, classes, and one record per finished round
    DIR/labeled.parquet    id, label, round: every label bought so far
    DIR/state.json         the commit point: the next round and current feature version
    DIR/run.log            the log
    DIR/features/v{k}/     the feature store
    DIR/checkpoints/TAG/   the fine-tuned model files (``model.pt``) and, while a fine-tune runs,
                           Ray Train's checkpoints

With ``storage`` set, the features and the checkpoints go to the run's own folder there
(``<storage>/<run>-<8 hex>/features`` and ``.../checkpoints``), named in ``DIR/storage.json``.
Credentials in a storage URI (``s3://KEY:SECRET@bucket/...``) are never written: config.yaml,
storage.json, the other JSON files and run.log show them as ``***`` (``asvp_ray.core.redact``); a
resume takes them from its config again (or the environment).

Every file is replaced atomically (temporary file, fsync, rename). ``state.json`` is written
last after a round, so a crash between files leaves rows that the next start rolls back.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from asvp_ray.core.errors import RunDirError
from asvp_ray.storage.locations import join_uri, run_folder_location, with_options_of
from asvp_ray.storage.atomic import atomic_write_bytes, atomic_write_json
from asvp_ray.features.store import FeatureStore
from asvp_ray.core.redact import redact_text, redact_uri

LABELED_SCHEMA = pa.schema([("id", pa.int64()), ("label", pa.int64()), ("round", pa.int64())])


class RunDir:
    """Paths, the lock, and atomic state I/O of one run directory.

    Args:
        path: the run directory (created on demand).
    """

    def __init__(self, path: Union[os.PathLike, str]):
        from asvp_ray.storage.locations import is_uri

        #: the run in a bucket (``s3://`` / ``gs://``), or None for a folder (see asvp_ray.loop.bucket)
        self.bucket = None
        if is_uri(path):
            from asvp_ray.loop.bucket import BucketRun

            self.bucket = BucketRun(str(path))
            self.bucket.pull()  # readers see the last commit; a writer pulls again under its lease
            self.path = self.bucket.cache
        else:
            self.path = Path(path)
        self._lock_fd: Optional[int] = None
        #: where fine-tunes write (a Path, or a URI with the config's options); set by open_store
        self.checkpoints: Union[Path, str] = self.path / "checkpoints"

    @property
    def location(self) -> str:
        """The run as the user named it: its folder, or its bucket URI with credentials redacted."""
        return self.bucket.where if self.bucket else str(self.path)

    @property
    def name(self) -> str:
        """The run's last path component (names its folder on a storage)."""
        if self.bucket:
            return self.bucket.where.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        return self.path.resolve().name

    # paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def labeled_path(self) -> Path:
        return self.path / "labeled.parquet"

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    @property
    def log_path(self) -> Path:
        return self.path / "run.log"

    @property
    def storage_path(self) -> Path:
        return self.path / "storage.json"

    def read_storage(self) -> Optional[Dict[str, Any]]:
        """``storage.json``: ``storage`` (the config key), ``features`` and ``checkpoints`` (this
        run's folders there), all with credentials redacted."""
        if not self.storage_path.is_file():
            return None
        return json.loads(self.storage_path.read_text())

    @staticmethod
    def _checkpoints_of(rec: Dict[str, Any]) -> str:
        # storage.json files written before checkpoints went to the storage name only ``features``
        if rec.get("checkpoints"):
            return rec["checkpoints"]
        base, sep, query = rec["features"].partition("?")
        return base.rstrip("/").rsplit("/", 1)[0] + "/checkpoints" + (sep + query if sep else "")

    @property
    def store(self) -> FeatureStore:
        """The run's feature store: where ``storage.json`` says, else ``DIR/features``. (Redacted
        credentials are dropped: pyarrow then takes them from the environment; with credentials in
        the config use :meth:`open_store`.)"""
        rec = self.read_storage()
        if rec and rec.get("storage") is None and self.bucket is not None:  # the run's own bucket: its options
            return FeatureStore(with_options_of(rec["features"], self.bucket.uri))
        return FeatureStore(with_options_of(rec["features"], None) if rec else self.path / "features")

    def open_store(self, storage: Optional[str]) -> FeatureStore:
        """The run's feature store for the config's ``storage``: ``DIR/features`` when it is null,
        else this run's own folder under it, chosen the first time and recorded in
        ``storage.json`` (before anything is written there), so a resume finds it again. Sets
        :attr:`checkpoints` (``DIR/checkpoints``, or the run's ``checkpoints`` folder there).

        storage.json holds the locations with credentials redacted; they are rebuilt with the
        options (and credentials) of ``storage``, the config's full URI.

        Raises:
            RunDirError: the run keeps its features under another storage than the config names.
        """
        rec = self.read_storage()
        if rec is not None and redact_uri(rec.get("storage")) != redact_uri(storage):
            raise RunDirError(f"{self.path} keeps its features at {rec['features']} (storage: {rec['storage']}), "
                              f"but the config says storage: {storage}; resume it with storage: {rec['storage']} "
                              "(and its credentials), or use a new --out")
        if storage is None and self.bucket is not None:  # a run in a bucket keeps its features there
            if rec is None:
                rec = {"storage": None, "features": join_uri(self.bucket.uri, "features"),
                       "checkpoints": join_uri(self.bucket.uri, "checkpoints")}
                atomic_write_json(self.storage_path, rec)  # redacted there
            self.checkpoints = with_options_of(self._checkpoints_of(rec), self.bucket.uri)
            return FeatureStore(with_options_of(rec["features"], self.bucket.uri))
        if storage is None:
            self.checkpoints = self.path / "checkpoints"
            return FeatureStore(self.path / "features")
        if rec is None:
            folder = run_folder_location(storage, Path(self.name))
            rec = {"storage": storage, "features": join_uri(folder, "features"),
                   "checkpoints": join_uri(folder, "checkpoints")}
            atomic_write_json(self.storage_path, rec)  # redacted there
        features = with_options_of(rec["features"], storage)
        checkpoints = with_options_of(self._checkpoints_of(rec), storage)
        self.checkpoints = checkpoints if "://" in checkpoints else Path(checkpoints)
        return FeatureStore(features)

    # lock
    def lock(self, force: bool = False, wait_s: float = 0.0) -> "RunDir":
        """Take the directory's exclusive lock (held until ``unlock`` or process exit).

        A run in a bucket takes its lease instead (renewed while this process runs) and then
        reads the last commit into its local folder.

        Args:
            force: a run in a bucket: take a lease another process holds.
            wait_s: wait up to this long for another process to let go (short commands such as
                ``label`` queue behind each other instead of failing).

        Raises:
            RunDirError: another process holds it (after ``wait_s``).
        """
        if self.bucket is not None:
            self.bucket.acquire(force=force, wait_s=wait_s)
            return self
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.3)
                    continue
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunDirError(f"run directory {self.path} is in use by another asvp-ray process ({holder}); "
                                  "wait for it to finish, stop it, or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        self._lock_fd = fd
        return self

    def unlock(self) -> None:
        if self.bucket is not None:
            if self.bucket.lease is not None and not self.bucket.lease.lost and self.state_path.is_file():
                try:
                    self.bucket.push()  # the log lines written since the last commit
                except Exception as e:  # noqa: BLE001 - the last round is committed already
                    import logging

                    logging.getLogger(__name__).warning("could not upload the run's last log lines to %s: %s",
                                                        self.location, e)
            self.bucket.release()
            return
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # state
    def write_config(self, text: str) -> None:
        """``config.yaml``, with credentials in URIs redacted."""
        atomic_write_bytes(self.config_path, redact_text(text).encode())

    def read_state(self) -> Optional[Dict[str, Any]]:
        if not self.state_path.is_file():
            return None
        return json.loads(self.state_path.read_text())

    def write_state(self, state: Dict[str, Any]) -> None:
        """state.json, the commit point. A run in a bucket then uploads every file that changed and
        commits them with one record (:meth:`asvp_ray.loop.bucket.BucketRun.push`)."""
        atomic_write_json(self.state_path, state)
        if self.bucket is not None:
            self.bucket.push()

    def read_summary(self) -> Optional[Dict[str, Any]]:
        if not self.summary_path.is_file():
            return None
        return json.loads(self.summary_path.read_text())

    def write_summary(self, summary: Dict[str, Any]) -> None:
        atomic_write_json(self.summary_path, summary)

    def read_labeled(self) -> Dict[str, np.ndarray]:
        """The labelled set as arrays ``id``, ``label``, ``round`` (empty when none yet)."""
        if not self.labeled_path.is_file():
            return {k: np.zeros(0, dtype=np.int64) for k in ("id", "label", "round")}
        t = pq.read_table(self.labeled_path)
        return {k: t.column(k).to_numpy().astype(np.int64) for k in ("id", "label", "round")}

    def write_labeled(self, ids: np.ndarray, labels: np.ndarray, rounds: np.ndarray) -> None:
        table = pa.table({"id": pa.array(ids, pa.int64()), "label": pa.array(labels, pa.int64()),
                          "round": pa.array(rounds, pa.int64())}, schema=LABELED_SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(self.labeled_path, sink.getvalue().to_pybytes())
