"""kdscale's per-user folder of derived facts that are slow to recompute and safe to redo:
``$KDSCALE_HOME`` (default ``~/.cache/kdscale``). Deleting it loses nothing but time.

Here: the sha256 of a teacher's local weight files, remembered by the file's metadata. A teacher's
fingerprint is the hash of its weight files' content, and every command that plans a cache computes
it: sha256 reads 0.5-0.85 GB/s on this machine, so a 16 GB teacher costs ~20-30 s per command and a
140 GB one 3-5 min, for files that have not changed. A remembered hash is used only while the file's
real path, size, modification time, change time (which ordinary tools cannot set back) and inode are
all the same as when it was read.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable

from kdscale import fs
from kdscale.fingerprint import digest


def home() -> str:
    return os.environ.get("KDSCALE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "kdscale")


def file_version(path: str) -> dict:
    """What changes whenever a local file's content may have: ctime moves on any write and
    ordinary tools cannot set it back (``touch`` sets mtime)."""
    stat = os.stat(path)
    return {
        "path": os.path.realpath(path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
        "inode": stat.st_ino,
    }


def file_sha256(uri: str) -> str:
    """``fs.sha256(uri)``, read once per version of a local file (remote files: read each time)."""
    if fs.is_remote(uri):
        return fs.sha256(uri)
    identity = file_version(uri)
    record = os.path.join(home(), "sha256", digest(identity, 32) + ".json")
    with contextlib.suppress(OSError, ValueError):
        with open(record) as f:
            kept = json.load(f)
        if kept.get("file") == identity and isinstance(kept.get("sha256"), str):
            return kept["sha256"]
    value = fs.sha256(uri)
    if file_version(uri) == identity:  # not changed while it was read
        _remember(record, {"file": identity, "sha256": value})
    return value


def _remember(record: str, content: dict) -> None:
    """Write ``record`` whole or not at all; a home that cannot be written keeps nothing."""
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(record), exist_ok=True)
        fd, scratch = tempfile.mkstemp(prefix=".", dir=os.path.dirname(record))
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(content, f)
            os.replace(scratch, record)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(scratch)


def files_sha256(uris: Iterable[str]) -> str:
    """One hash of several files: sha256 over their hex digests, in order (a teacher's weights)."""
    import hashlib

    h = hashlib.sha256()
    for uri in uris:
        h.update(file_sha256(uri).encode())
    return h.hexdigest()
