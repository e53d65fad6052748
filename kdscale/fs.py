"""Every path in kdscale goes through fsspec, so a local folder and ``s3://bucket/prefix`` behave
the same. These helpers keep URI handling in one place (joining, globbing, whole-object writes).

Object stores have no atomic rename, so durability comes from *what* we write last (the cache
manifest), not from renames: :func:`write_bytes` writes one object whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

_HASH_CHUNK = 8 << 20
TEMP_MARK = ".tmp-"  # write_bytes writes <name>.tmp-<pid>, then renames it to <name>


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def normalize(uri: str) -> str:
    """Absolute local paths (so Ray workers in other cwds agree); URIs unchanged."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return uri if is_remote(uri) else os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the protocol-less path for ``uri``."""
    return url_to_fs(uri)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def is_file(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.isfile(path)


def _with_protocol(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    if not is_remote(like):
        return path
    return fs.unstrip_protocol(path)


def expand(pattern: str) -> list[str]:
    """Files matching a path, folder (all files below it) or glob, sorted for determinism."""
    fs, path = filesystem(pattern)
    if any(ch in path for ch in "*?["):
        found = fs.glob(path)
    elif fs.isdir(path):
        found = fs.find(path)
    elif fs.exists(path):
        found = [path]
    else:
        found = []
    return sorted(_with_protocol(fs, p, pattern) for p in found if fs.isfile(p))


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write one object whole (see :func:`open_for_write`)."""
    with open_for_write(uri) as f:
        f.write(data)


@contextlib.contextmanager
def open_for_write(uri: str) -> Iterator[IO[bytes]]:
    """A binary file that appears under ``uri`` only once the block ends without an error, so a
    crash never leaves a half-written file under the final name and a large file can be written
    piece by piece: local files go through a temp file + fsync + rename; an object store
    publishes the object on close, so a failed block is discarded instead (a multipart upload
    aborted) and never closed."""
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_remote(uri):
        f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            _abandon(f)
            raise
        f.close()
        return
    tmp = f"{path}{TEMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def _abandon(f: Any) -> None:
    """Drop an object-store file being written without publishing it: fsspec's buffered files
    upload what they hold when closed (also when garbage-collected), so discard the upload and
    mark the file closed."""
    getattr(f, "discard", lambda: None)()
    try:
        f.closed = True
    except AttributeError:  # a file type whose closed flag is read-only (fsspec's in-memory one)
        pass


def remove_temp_files(folder_uri: str) -> list[str]:
    """Delete the temp files that writers killed mid-write left in a local folder (``write_bytes``
    renames a finished file into place, so a leftover temp file is never part of a result);
    returns their names. Call it only when no writer is running."""
    if is_remote(folder_uri) or not os.path.isdir(folder_uri):
        return []
    stale = [name for name in os.listdir(folder_uri) if TEMP_MARK in name]
    for name in stale:
        os.remove(os.path.join(folder_uri, name))
    return stale


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def size(uri: str) -> int:
    fs, path = filesystem(uri)
    return int(fs.size(path))


def sha256(uri: str) -> str:
    fs, path = filesystem(uri)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def put_dir(local_dir: str, uri: str) -> None:
    """Copy a local folder to any URI (used to publish exports and checkpoints)."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        import shutil

        shutil.copytree(local_dir, path, dirs_exist_ok=True)
        return
    fs.put(local_dir.rstrip("/") + "/", path, recursive=True)


def listdir(uri: str) -> list[str]:
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def local_copy(uri: str) -> str:
    """A local path with ``uri``'s contents: the path itself when local, else a download of the
    folder or file into a fresh temp folder (for libraries that only read local files)."""
    if not is_remote(uri):
        return uri
    import tempfile

    local = tempfile.mkdtemp(prefix="kdscale-")
    fsys, path = filesystem(uri)
    if fsys.isdir(path):
        fsys.get(path.rstrip("/") + "/", local, recursive=True)
        return local
    target = os.path.join(local, posixpath.basename(path))
    fsys.get(path, target)
    return target
