"""Where things are: plain paths or object-store URIs (``s3://``, ``gs://``) reached through
``pyarrow.fs``; one filesystem object per bucket and options; whole-object reads and writes;
the ``storage`` key's checks; a run's own folder under its storage."""
from __future__ import annotations

import functools
import os
import re
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, List, Optional, Tuple

import pyarrow as pa
import pyarrow.fs as pafs

from asvp_ray.core.redact import MASK

_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# Object stores the storage key accepts (pyarrow.fs reaches them; credentials come from the
# usual environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL, gcloud, ...).
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs")


def uri_scheme(location: Any) -> Optional[str]:
    """The lower-case scheme of a URI (``s3``, ``gs``, ``file``), None for a plain path."""
    m = _SCHEME_RE.match(str(location)) if isinstance(location, (str, os.PathLike)) else None
    return m.group(1).lower() if m else None


def is_uri(location: Any) -> bool:
    """True for a URI other than ``file://``: a location reached through ``pyarrow.fs``."""
    return uri_scheme(location) not in (None, "file")


def local_path(location: Any) -> Path:
    """A plain path of ``location`` (``file:///x`` -> ``/x``)."""
    s = str(location)
    return Path(urllib.parse.urlsplit(s).path) if uri_scheme(s) == "file" else Path(s)


def join_uri(uri: str, *names: Any) -> str:
    """``uri`` with path components appended, its query (``?endpoint_override=...``) kept last."""
    base, sep, query = str(uri).partition("?")
    base = base.rstrip("/")
    for n in names:
        n = str(n).strip("/")
        if n:
            base += "/" + n
    return base + (sep + query if sep else "")


def location_fs(location: Any) -> Tuple[pafs.FileSystem, str]:
    """The ``pyarrow.fs`` filesystem and the path inside it of a location: a URI (see
    :func:`resolve_uri`), or a plain path on the local filesystem (made absolute)."""
    if is_uri(location):
        return resolve_uri(str(location))
    return pafs.LocalFileSystem(), str(local_path(location).expanduser().resolve())


def with_options_of(location: str, storage: Optional[str]) -> str:
    """A location under ``storage`` as it was recorded (credentials redacted), made usable again:
    the bucket and query options (credentials included) come from ``storage``, the config's full
    URI; without it, redacted options are dropped (pyarrow then takes credentials from the
    environment). Plain paths are returned as they are."""
    if not is_uri(location):
        return location
    loc = urllib.parse.urlsplit(str(location))
    if storage is not None and is_uri(storage):
        st = urllib.parse.urlsplit(str(storage))
        return urllib.parse.urlunsplit((loc.scheme, st.netloc, loc.path, st.query, ""))
    netloc = loc.netloc.rpartition("@")[2] if loc.netloc.startswith(MASK) else loc.netloc
    query = "&".join(q for q in loc.query.split("&") if q and not q.endswith("=" + MASK))
    return urllib.parse.urlunsplit((loc.scheme, netloc, loc.path, query, ""))


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, netloc: str, query: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(f"{scheme}://{netloc}/" + (f"?{query}" if query else ""))[0]


def resolve_uri(uri: str) -> Tuple[pafs.FileSystem, str]:
    """The ``pyarrow.fs`` filesystem and the path inside it of a URI (percent-escapes decoded, as
    ``pyarrow.fs.FileSystem.from_uri`` decodes them); one filesystem object per process for each
    bucket and set of options on an object store (workers resolve the same folder many times,
    read tasks every image's URI: a new one costs a credentials lookup and a connection pool)."""
    parts = urllib.parse.urlsplit(str(uri))
    scheme = parts.scheme.lower()
    if scheme in OBJECT_STORE_SCHEMES:
        bucket = parts.netloc.rpartition("@")[2]  # after the credentials s3://KEY:SECRET@bucket may hold
        path = urllib.parse.unquote(parts.path)
        return _filesystem(scheme, parts.netloc, parts.query), (bucket + path).rstrip("/")
    fs, path = pafs.FileSystem.from_uri(str(uri))
    return fs, path.rstrip("/")


def check_storage(storage: Optional[str], key: str = "config key 'storage'") -> Optional[str]:
    """The ``storage`` key's value checked for its form (no network): None, a local path, or an
    object-store URI ``s3://bucket[/prefix]`` / ``gs://bucket[/prefix]``.

    Raises:
        ConfigError: an unknown scheme or a URI without a bucket, naming ``key`` (what the value
            was given as) and the fix.
    """
    from asvp_ray.core.errors import ConfigError

    if storage is None:
        return None
    storage = str(storage).strip()
    scheme = uri_scheme(storage)
    if not storage:
        raise ConfigError(f"{key} is empty; set it to a local folder, s3://bucket/prefix or "
                          "gs://bucket/prefix, or null for the run directory")
    if scheme is None or scheme == "file":
        return storage
    if scheme not in OBJECT_STORE_SCHEMES:
        raise ConfigError(f"{key} ({storage}): unknown scheme {scheme!r}; use a local folder, "
                          "s3://bucket/prefix or gs://bucket/prefix (options such as "
                          "?endpoint_override=host:port&scheme=http after it)")
    if not urllib.parse.urlsplit(storage).netloc.rpartition("@")[2]:
        raise ConfigError(f"{key} ({storage}) names no bucket; write {scheme}://BUCKET/prefix")
    return storage


def check_storage_reachable(storage: Optional[str]) -> None:
    """At run start: an object-store ``storage`` must parse (pyarrow's options) and its bucket
    must exist and answer; and the run must be able to write there (a local folder is created):
    a small probe file is written under the prefix and deleted again.

    Raises:
        ConfigError: naming the key, the location (credentials redacted), what failed and the fix.
    """
    from asvp_ray.core.errors import ConfigError

    storage = check_storage(storage)
    if storage is None:
        return
    remote = is_uri(storage)
    if remote:
        bucket = urllib.parse.urlsplit(storage).netloc.rpartition("@")[2]
        try:
            fs, base = resolve_uri(storage)
        except (pa.ArrowInvalid, ValueError) as e:
            raise ConfigError(f"config key 'storage' ({storage}): {e}; fix the URI (for s3: region, scheme, "
                              "endpoint_override, ... as pyarrow.fs.S3FileSystem takes them; for gs: scheme, "
                              "endpoint_override, location, retry_limit_seconds, and no user info but "
                              "gs://anonymous@bucket)") from None
        try:
            info = fs.get_file_info(bucket)
        except OSError as e:
            creds = ("GOOGLE_APPLICATION_CREDENTIALS or gcloud's application-default login; gs://anonymous@BUCKET "
                     "for none" if uri_scheme(storage) in ("gs", "gcs") else
                     "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL")
            raise ConfigError(f"config key 'storage' ({storage}): the object store does not answer ({e}); check "
                              f"the endpoint and the credentials ({creds} or ?endpoint_override=)") from None
        if info.type == pafs.FileType.NotFound:
            raise ConfigError(f"config key 'storage' ({storage}): bucket {bucket!r} does not exist there; create it "
                              "or name an existing one")
    else:
        fs, base = pafs.LocalFileSystem(), str(local_path(storage).expanduser().resolve())
    probe = f"{base}/.asvp-write-check-{uuid.uuid4().hex[:12]}"
    try:
        if not remote:
            fs.create_dir(base, recursive=True)
        put_bytes(fs, probe, b"asvp-ray checks that it may write here; this file is deleted at once\n")
        fs.delete_file(probe)
    except OSError as e:
        fix = ("give the credentials write access to the prefix (s3:PutObject and s3:DeleteObject, or "
               "storage.objects.create and .delete on gs: the bucket policy or the user's role)" if remote else
               "make the folder writable for this user (chmod / chown) or choose another folder")
        raise ConfigError(f"config key 'storage' ({storage}): this run cannot write there ({e}); {fix}") from None


def run_folder_location(storage: str, run_dir: Path) -> str:
    """A new run's own folder under ``storage``: ``<storage>/<run name>-<8 hex>`` (unique, so runs
    sharing a bucket never meet). It holds ``features/`` (the feature store) and ``checkpoints/``
    (the fine-tuned model files and Ray Train's checkpoints)."""
    name = f"{Path(run_dir).resolve().name}-{uuid.uuid4().hex[:8]}"
    if is_uri(storage):
        return join_uri(storage, name)
    return str(local_path(storage).expanduser().resolve() / name)


def run_store_location(storage: str, run_dir: Path) -> str:
    """A new run's own feature-store folder under ``storage``: ``<run folder>/features``
    (:func:`run_folder_location`)."""
    return join_uri(run_folder_location(storage, run_dir), "features")


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def child_folders(fs: pafs.FileSystem, path: str) -> List[str]:
    """Names of the folders directly under ``path`` on an object store: the first name of every
    object below it. A recursive listing, because pyarrow's GcsFileSystem lists only objects (and
    folder marker objects) when asked for one level: a prefix that only objects' names make (what
    the store writes) is no folder to it, where S3FileSystem would list it."""
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    names = set()
    for i in infos:
        head, sep, _ = i.path[len(path) + 1:].partition("/")
        if head and (sep or i.type == pafs.FileType.Directory):
            names.add(head)
    return sorted(names)


def delete_prefix(fs: pafs.FileSystem, path: str) -> None:
    """Every object under ``path`` deleted (none there is fine), then its folder marker if one
    exists. ``delete_dir`` alone fails on GCS where no marker was written (pyarrow's
    GcsFileSystem deletes the objects, then the marker ``path/``, which is not there)."""
    fs.delete_dir_contents(path, missing_dir_ok=True)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def put_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """One object written whole (an object store makes it visible only once complete)."""
    with fs.open_output_stream(path) as f:
        f.write(data)
