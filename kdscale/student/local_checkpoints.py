"""The node-local folders a training worker saves an epoch's checkpoint into before Ray Train
moves it to the run's storage (and deletes it).

A worker killed between the save and the upload (node loss, OOM, the fault tests' kills) leaves
its folder behind: a full DeepSpeed state plus a Hugging Face copy of the student, per rank, in
the node's temp dir, which a long-lived node fills up with. So each folder's name carries the
saving process's id (``kdscale-ckpt-<student>@<host>:<pid>-<random>``, the host as
:func:`kdscale.processes.host` names it), and every save first removes
the folders of this student whose process is gone. Folders of live processes (another run of a
student with the same name, a worker still uploading) are never touched.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile

from kdscale.processes import alive, host

CHECKPOINT_PREFIX = "kdscale-ckpt-"
OWNER_MARK = "@"  # not allowed in a student's name (config.NAME_PATTERN): no other student's folder matches


def folders(student: str) -> list[str]:
    """This student's checkpoint folders in this node's temp dir (of any process)."""
    return glob.glob(os.path.join(tempfile.gettempdir(), f"{CHECKPOINT_PREFIX}{student}{OWNER_MARK}*"))


def _owner_tag() -> str:
    """``<host>:<pid>``: the host too, since a temp dir may be shared by machines (or containers)
    whose process ids say nothing about each other's."""
    return f"{host()}:{os.getpid()}"


def _local_owner(folder: str) -> int | None:
    """The id of the process on this host that made ``folder``; None for a folder of another
    host or a name this module did not make."""
    recorded, _, rest = os.path.basename(folder).rsplit(OWNER_MARK, 1)[1].rpartition(":")
    pid = rest.split("-", 1)[0]
    return int(pid) if recorded == host() and pid.isdigit() else None


def remove_orphans(student: str) -> list[str]:
    """Remove this student's checkpoint folders whose saving process has exited; returns them."""
    removed = []
    for folder in folders(student):
        pid = _local_owner(folder)
        if pid is not None and pid != os.getpid() and not alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def new_folder(student: str) -> str:
    """A fresh checkpoint folder for ``student``, after removing the ones dead workers left."""
    remove_orphans(student)
    return tempfile.mkdtemp(prefix=f"{CHECKPOINT_PREFIX}{student}{OWNER_MARK}{_owner_tag()}-")
