"""A run directory kept in a bucket (``--out s3://bucket/prefix`` or ``gs://...``).

Object stores have no rename, no file lock and no hard link, so a run directory there is kept as:

    PREFIX/_commit.json          the commit record: generation, and per file its object and digest
    PREFIX/_lease.json           the writer's lease: holder, host, pid, token, expiry
    PREFIX/gen/<G>/<file>        the files of generation G (config.yaml, summary.json, state.json,
                                 labeled.parquet, run.log, queries/..., ...)
    PREFIX/features/, checkpoints/   the feature store (manifest-last versions) and the model files

A process works in a private local folder (the cache): it is filled from the files the commit
record names when the run is opened, and every commit of the run (``RunDir.write_state``) uploads
the files that changed into a new generation and then PUTs ``_commit.json``: that single PUT
makes them current, so a kill at any instant leaves readers either the previous round or the new
one. Objects under ``gen/`` that no commit names (a writer killed between its uploads and its
commit record) are removed by the next writer.

One writer at a time: the lease object, renewed by the running process every third of its time
to live (``ASVP_LEASE_TTL_S``, default 60 s). A second writer is refused with a message naming the
holder and when the lease expires; a lease left by a killed process is taken over once it has
expired (``ASVP_LEASE_FORCE=1`` / ``--force`` takes it at once, with a warning). Object stores
have no compare-and-swap here, so taking a lease writes it, waits a moment and reads it back:
of two processes racing for one free lease, the one whose write landed last keeps it.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Optional

import pyarrow.fs as pafs

from asvp_ray.core.errors import RunDirError
from asvp_ray.storage.locations import join_uri, resolve_uri
from asvp_ray.core.redact import redact_uri

log = logging.getLogger(__name__)

COMMIT = "_commit.json"
LEASE = "_lease.json"
GEN = "gen"
#: local files never uploaded (the local lock, temporary files of atomic writes)
_SKIP = (".lock",)


def lease_ttl_s() -> float:
    return float(os.environ.get("ASVP_LEASE_TTL_S", "60"))


def _read(fs: pafs.FileSystem, path: str) -> Optional[bytes]:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (FileNotFoundError, OSError) as e:
        if isinstance(e, FileNotFoundError) or "not found" in str(e).lower() or "no such" in str(e).lower():
            return None
        raise


def _put(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def _read_json(fs: pafs.FileSystem, path: str) -> Optional[Dict[str, Any]]:
    """A small JSON object (the lease, the commit record), or None when it is not there. Another
    process may replace it while it is read (pyarrow reads the size, then the bytes): a torn read
    is tried again."""
    for attempt in range(6):
        try:
            data = _read(fs, path)
            return json.loads(data) if data else None
        except (ValueError, OSError):
            if attempt == 5:
                raise
            time.sleep(0.05 * (attempt + 1))
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Lease:
    """The single-writer lease of a run in a bucket (see the module's docstring)."""

    def __init__(self, fs: pafs.FileSystem, root: str, where: str):
        self.fs, self.path, self.where = fs, f"{root}/{LEASE}", where
        self.token = uuid.uuid4().hex
        self.record: Dict[str, Any] = {}
        self.lost = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def read(self) -> Optional[Dict[str, Any]]:
        return _read_json(self.fs, self.path)

    def _write(self) -> None:
        ttl = lease_ttl_s()
        self.record = {"holder": f"pid {os.getpid()} on {socket.gethostname()}", "host": socket.gethostname(),
                       "pid": os.getpid(), "token": self.token, "ttl_s": ttl, "renewed_at": time.time(),
                       "expires_at": time.time() + ttl}
        _put(self.fs, self.path, json.dumps(self.record, indent=1).encode())

    def acquire(self, force: bool = False, wait_s: float = 0.0) -> None:
        """Take the lease, or raise RunDirError naming who holds it and until when. With
        ``wait_s``, a lease held by another process (or lost in a race for a free one) is tried
        again until it is free or ``wait_s`` has passed: short commands (``label``) queue."""
        deadline = time.monotonic() + wait_s
        waited = False
        while True:
            try:
                self._acquire_once(force)
                return
            except RunDirError as e:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                if not waited:
                    log.info("waiting up to %.0f s for the run: %s", left, str(e).split(";")[0])
                    waited = True
                time.sleep(min(0.5 + random.random(), max(left, 0.05)))

    def _acquire_once(self, force: bool) -> None:
        force = force or os.environ.get("ASVP_LEASE_FORCE") == "1"
        cur = self.read()
        if cur and cur.get("token") != self.token:
            left = float(cur.get("expires_at", 0)) - time.time()
            if left > 0 and not force:
                raise RunDirError(
                    f"run {self.where} is in use by another asvp-ray process ({cur.get('holder')}); its lease expires "
                    f"at {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(cur['expires_at']))} (in {left:.0f} s) "
                    "unless that process renews it. Wait for it to finish or stop it; if it was killed, rerun once the "
                    "lease has expired, or take it now with --force (ASVP_LEASE_FORCE=1) if you are sure it is gone")
            if left > 0:
                log.warning("taking over the lease of %s from %s although it is valid for %.0f s more (--force); "
                            "if that process still runs, the two will overwrite each other's rounds",
                            self.where, cur.get("holder"), left)
            else:
                log.warning("taking over the lease of %s left by %s (expired %.0f s ago: that process is gone)",
                            self.where, cur.get("holder"), -left)
        self._write()
        time.sleep(float(os.environ.get("ASVP_LEASE_SETTLE_S", "0.5")))
        back = self.read()
        if not back or back.get("token") != self.token:
            raise RunDirError(f"run {self.where} was taken by another asvp-ray process "
                              f"({(back or {}).get('holder', 'unknown')}) while this one started; wait for it or stop it")
        self._thread = threading.Thread(target=self._renew, name="asvp-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(max(lease_ttl_s() / 3.0, 0.2)):
            try:
                cur = self.read()
                if cur and cur.get("token") != self.token:
                    self.lost = True
                    log.error("the lease of %s was taken by %s: this process stops committing", self.where,
                              cur.get("holder"))
                    return
                self._write()
            except Exception as e:  # noqa: BLE001 - a network blip: try again at the next tick
                log.warning("renewing the lease of %s failed (%s); retrying", self.where, e)

    def check(self) -> None:
        """Raise if this process no longer holds the lease (it must not commit): the lease object
        is read, so a writer that lost a race for it finds out before its commit record."""
        if not self.lost:
            cur = self.read()
            if not cur or cur.get("token") != self.token:
                self.lost = True
                log.error("the lease of %s is held by %s now: this process does not commit", self.where,
                          (cur or {}).get("holder", "nobody"))
        if self.lost:
            raise RunDirError(f"this process lost the lease of {self.where} to another process; it did not commit. "
                              "Only one process may write a run")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if not self.lost:
            try:
                cur = self.read()
                if cur and cur.get("token") == self.token:
                    self.fs.delete_file(self.path)
            except Exception as e:  # noqa: BLE001 - it expires anyway
                log.warning("could not remove the lease of %s (%s); it expires by itself", self.where, e)


class BucketRun:
    """The bucket side of a run directory: pull the committed files into a local cache, push a new
    generation and commit it, hold the lease."""

    def __init__(self, uri: str):
        self.uri = str(uri).rstrip("/")
        self.where = redact_uri(self.uri)
        self.fs, self.root = resolve_uri(self.uri)
        self.cache = Path(tempfile.mkdtemp(prefix="asvp-run-"))
        atexit.register(shutil.rmtree, self.cache, True)
        self.record: Optional[Dict[str, Any]] = None
        self.lease: Optional[Lease] = None

    def location(self, *names: str) -> str:
        """The URI of ``names`` under the run's prefix (with the run's options and credentials)."""
        return join_uri(self.uri, *names)

    def read_record(self) -> Optional[Dict[str, Any]]:
        return _read_json(self.fs, f"{self.root}/{COMMIT}")

    def pull(self) -> Optional[Dict[str, Any]]:
        """Replace the cache's contents by the files of the current commit; returns its record."""
        for child in self.cache.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        self.record = self.read_record()
        for rel, f in (self.record or {}).get("files", {}).items():
            dst = self.cache / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(f"{self.root}/{f['object']}") as src, open(dst, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        return self.record

    def acquire(self, force: bool = False, wait_s: float = 0.0) -> None:
        self.lease = Lease(self.fs, self.root, self.where)
        self.lease.acquire(force, wait_s)
        self.pull()  # what was committed up to now, under the lease
        self.collect_garbage()

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def push(self) -> Dict[str, Any]:
        """Upload the files that changed into a new generation, then PUT the commit record."""
        if self.lease is None:
            raise RunDirError(f"{self.where}: committing needs the run's lease (open it for writing)")
        self.lease.check()
        old = (self.record or {}).get("files", {})
        gen = int((self.record or {}).get("generation", 0)) + 1
        files: Dict[str, Dict[str, Any]] = {}
        t0 = time.perf_counter()
        uploaded = 0
        for p in sorted(self.cache.rglob("*")):
            if not p.is_file() or p.name in _SKIP or p.name.startswith(".tmp"):
                continue
            rel = p.relative_to(self.cache).as_posix()
            digest = _sha256(p)
            if rel in old and old[rel]["sha256"] == digest:
                files[rel] = old[rel]
                continue
            obj = f"{GEN}/{gen}/{rel}"
            with open(p, "rb") as src, self.fs.open_output_stream(f"{self.root}/{obj}") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            files[rel] = {"object": obj, "sha256": digest, "size": p.stat().st_size}
            uploaded += 1
        self.lease.check()
        from asvp_ray.runtime.faults import fault_point

        fault_point("bucket:before_commit")
        record = {"generation": gen, "files": files, "committed_at": time.time(),
                  "writer": (self.lease.record or {}).get("holder")}
        _put(self.fs, f"{self.root}/{COMMIT}", json.dumps(record, indent=1).encode())
        self.record = record
        fault_point("bucket:after_commit")
        log.debug("committed %s generation %d (%d of %d files uploaded) in %.3f s", self.where, gen, uploaded,
                  len(files), time.perf_counter() - t0)
        self.collect_garbage()
        return record

    def collect_garbage(self) -> None:
        """Remove objects under gen/ that the current commit does not name."""
        named = {f["object"] for f in (self.record or {}).get("files", {}).values()}
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(f"{self.root}/{GEN}", recursive=True,
                                                            allow_not_found=True))
        except FileNotFoundError:
            return
        for i in infos:
            if i.type == pafs.FileType.File and i.path[len(self.root) + 1:] not in named:
                try:
                    self.fs.delete_file(i.path)
                except OSError as e:  # the next writer tries again
                    log.debug("could not remove %s: %s", i.path, e)


def read_committed(uri: str, rel: str) -> Optional[bytes]:
    """One file of the current commit of the run at ``uri`` (``summary.json``, ...), or None when
    the run has no commit or the commit names no such file; reads nothing else."""
    fs, root = resolve_uri(str(uri).rstrip("/"))
    for _ in range(3):  # a writer may commit and remove the object between the two reads
        entry = ((_read_json(fs, f"{root}/{COMMIT}") or {}).get("files", {})).get(rel)
        if entry is None:
            return None
        obj = _read(fs, f"{root}/{entry['object']}")
        if obj is not None:
            return obj
    return None


def wait_for_lease(uri: str, wait_s: float) -> None:
    """Wait until no valid lease holds the run at ``uri`` (at most ``wait_s`` seconds): a process
    killed without releasing its lease (a Tune trial stopped by Ctrl+C) holds it until it expires."""
    fs, root = resolve_uri(str(uri).rstrip("/"))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        cur = _read_json(fs, f"{root}/{LEASE}")
        left = float(cur.get("expires_at", 0)) - time.time() if cur else 0.0
        if left <= 0:
            return
        log.info("run %s is still leased by %s for %.0f s; waiting", redact_uri(uri), cur.get("holder"), left)
        time.sleep(min(left + 0.5, 5.0, max(deadline - time.monotonic(), 0.1)))

