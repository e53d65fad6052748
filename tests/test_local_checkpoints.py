"""Checkpoint folders a killed training worker left in the node's temp dir are removed by the
next save; those of live processes, of other students and of names kdscale did not make stay."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import uuid

from kdscale.student.local_checkpoints import CHECKPOINT_PREFIX, OWNER_MARK, folders, new_folder, remove_orphans


def _exited_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _folder(student: str, suffix: str) -> str:
    path = os.path.join(tempfile.gettempdir(), f"{CHECKPOINT_PREFIX}{student}{OWNER_MARK}{suffix}")
    os.makedirs(os.path.join(path, "deepspeed"))
    return path


def test_next_save_removes_only_dead_workers_folders():
    student = f"ckpt-test-{uuid.uuid4().hex[:8]}"
    host = socket.gethostname()
    dead = _folder(student, f"{host}:{_exited_pid()}-abc")
    live = _folder(student, f"{host}:{os.getppid()}-abc")  # another live process: maybe still uploading
    own = _folder(student, f"{host}:{os.getpid()}-old")
    foreign = _folder(student, "notapid")
    other_host = _folder(student, f"{host}x:{_exited_pid()}-abc")  # its pids say nothing about this host's
    other_student = _folder(f"{student}-{_exited_pid()}", f"{host}:{_exited_pid()}-abc")  # digits in its name
    try:
        fresh = new_folder(student)
        assert not os.path.exists(dead)
        assert all(os.path.isdir(p) for p in (live, own, foreign, other_host, other_student, fresh))
        assert os.path.basename(fresh).startswith(f"{CHECKPOINT_PREFIX}{student}{OWNER_MARK}{host}:{os.getpid()}-")
        assert sorted(folders(student)) == sorted([live, own, foreign, other_host, fresh])
        assert remove_orphans(student) == []  # nothing else is an orphan
    finally:
        for path in (live, own, foreign, other_host, other_student, fresh):
            subprocess.run(["rm", "-rf", path], check=True)
