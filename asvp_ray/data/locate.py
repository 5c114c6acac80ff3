"""Finding a source's data files as users name them: one file, a folder, a glob
(``shards/*.tar``), WebDataset's brace notation (``shard-{000000..000999}.tar``, expanded by the
``braceexpand`` package WebDataset itself uses) or a list of any of these; local paths or
``s3://`` / ``gs://`` URIs (one ``pyarrow.fs`` filesystem, :func:`asvp_ray.storage.locations.resolve_uri`).

Each file is listed with its size and modification time (:class:`Located`): an index built from
the files is valid only while those stay the same (:func:`changed_files`).
"""
from __future__ import annotations

import fnmatch
import urllib.parse
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import pyarrow.fs as pafs

from asvp_ray.core.errors import BadInputError
from asvp_ray.storage.locations import is_uri, local_path, resolve_uri

_GLOB = set("*?[")


@dataclass
class Located:
    """The files of a source, in one filesystem.

    Attributes:
        prefix: ``s3://`` / ``gs://`` (with the location's credentials part) or ``""`` for local paths.
        options: the URIs' ``?query`` (endpoint and the like), ``""`` when none.
        paths: the files' paths inside the filesystem, in the order the user listed them (a
            folder's or a glob's files sorted by name).
        sizes, mtimes: each file's size in bytes and modification time in ns (what its index
            was built against).
    """

    prefix: str
    options: str
    paths: List[str]
    sizes: List[int]
    mtimes: List[int]

    def uri(self, i: int) -> str:
        """File ``i`` as a URI (or a local path) a worker can open with :func:`open_fs`."""
        return f"{self.prefix}{self.paths[i]}{self.options}"

    def where(self) -> str:
        """The filesystem's URI for :func:`open_fs` (options included)."""
        return f"{self.prefix}{self.paths[0] if self.paths else ''}{self.options}"


def open_fs(where: str) -> pafs.FileSystem:
    """The filesystem behind a :meth:`Located.where` (cached per process for object stores)."""
    if is_uri(where):
        return resolve_uri(where)[0]
    return pafs.LocalFileSystem()


def _split(location: str) -> Tuple[str, str, str]:
    """``(prefix, path, options)`` of a URI or a local path (local paths made absolute: read tasks
    may run in other working folders)."""
    if is_uri(location):
        u = urllib.parse.urlsplit(location)
        if u.scheme.lower() == "file":
            return "", urllib.parse.unquote(u.path), ""
        _, path = resolve_uri(location)
        netloc = u.netloc
        creds = netloc.rpartition("@")[0]
        return f"{u.scheme}://{creds + '@' if creds else ''}", path, f"?{u.query}" if u.query else ""
    return "", str(local_path(location).resolve()), ""


def _expand_braces(pattern: str) -> List[str]:
    if "{" not in pattern:
        return [pattern]
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def locate(spec: Union[str, Sequence[str]], *, suffixes: Sequence[str], key: str,
           what: str = "file") -> Located:
    """The files a source's setting names.

    Args:
        spec: a file, folder, glob or brace pattern, or a list of these.
        suffixes: file endings a folder's files must have (``(".tar",)``); named files are taken
            as given.
        key: the config key, for messages (``data.pool.shards``).
        what: what a file is, for messages (``shard``).

    Raises:
        BadInputError: nothing found, a named file missing, files in more than one filesystem,
            a file listed twice; each naming the item and the fix.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise BadInputError(f"{key} is empty; name the {what}s (a folder, a glob, a brace pattern or a list)")
    prefix = options = None
    fs = None
    found: List[pafs.FileInfo] = []
    for item in items:
        item = str(item).strip()
        for pat in _expand_braces(item):
            p_prefix, path, p_options = _split(pat)
            if prefix is None:
                prefix, options = p_prefix, p_options
                fs = open_fs(pat)
            elif (p_prefix, p_options) != (prefix, options):
                raise BadInputError(f"{key}: {pat!r} is in another place than the first {what} "
                                    f"({prefix or 'local files'}); keep every {what} in one bucket or file system")
            found += _files_of(fs, path, pat, suffixes, key, what)
    seen = set()
    for info in found:
        if info.path in seen:
            raise BadInputError(f"{key}: {what} {info.path!r} is listed twice; name each {what} once")
        seen.add(info.path)
    if not found:
        raise BadInputError(f"{key} {spec!r} names no {what} ({', '.join(suffixes)}); check the location")
    return Located(prefix or "", options or "", [f.path for f in found], [int(f.size) for f in found],
                   [int(f.mtime_ns or 0) for f in found])


def _files_of(fs: pafs.FileSystem, path: str, shown: str, suffixes: Sequence[str], key: str,
              what: str) -> List[pafs.FileInfo]:
    try:
        if _GLOB & set(path):
            base = path[:min(path.index(c) for c in _GLOB if c in path)].rpartition("/")[0] or "/"
            infos = fs.get_file_info(pafs.FileSelector(base, recursive="/" in path[len(base) + 1:],
                                                       allow_not_found=True))
            out = sorted((i for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, path)),
                         key=lambda i: i.path)
            if not out:
                raise BadInputError(f"{key}: {shown!r} matches no {what}; check the pattern")
            return out
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [info]
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            return sorted((i for i in infos if i.type == pafs.FileType.File and i.path.lower().endswith(tuple(suffixes))
                           and not i.base_name.startswith(".")), key=lambda i: i.path)
    except OSError as e:
        raise BadInputError(f"{key}: {shown!r} cannot be reached ({e}); check the location and credentials") from None
    raise BadInputError(f"{key}: {what} {shown!r} does not exist; fix the list or restore the {what}")


def fs_and_path(uri: str) -> Tuple[pafs.FileSystem, str]:
    """The filesystem and the path in it of a :meth:`Located.uri` (a URI or a local path)."""
    return resolve_uri(uri) if is_uri(uri) else (pafs.LocalFileSystem(), uri)


def _difference(path: str, then: Tuple[int, int], now: Optional[Tuple[int, int]]) -> Optional[str]:
    """``"path: why"`` when a file's (size, mtime) ``now`` (None: gone) is not ``then``."""
    if now is None:
        return f"{path}: missing"
    if now[0] != then[0]:
        return f"{path}: size {then[0]} -> {now[0]} bytes"
    if now[1] != then[1]:
        return f"{path}: modified since (same size)"
    return None


def differences(then: Located, now: Located) -> List[str]:
    """The files of ``then`` that ``now`` (the same paths, listed again) shows changed."""
    return [d for p, a, b in zip(then.paths, zip(then.sizes, then.mtimes), zip(now.sizes, now.mtimes))
            if (d := _difference(p, a, b))]


def changed_files(located: Located, indices: Optional[Sequence[int]] = None) -> List[str]:
    """Files (of ``indices``, default all) whose size or modification time differ from
    ``located``'s, or that are gone: one ``"path: why"`` line each (empty: all unchanged)."""
    fs = open_fs(located.where())
    idx = list(range(len(located.paths))) if indices is None else list(indices)
    try:
        infos = fs.get_file_info([located.paths[i] for i in idx])
    except OSError as e:
        return [f"{located.paths[idx[0]] if idx else '?'}: cannot be reached ({e})"]
    out = []
    for i, info in zip(idx, infos):
        now = (int(info.size), int(info.mtime_ns or 0)) if info.type == pafs.FileType.File else None
        d = _difference(located.paths[i], (located.sizes[i], located.mtimes[i]), now)
        if d:
            out.append(d)
    return out
