"""Checkpoint folders a killed training worker left in the node's temp dir are removed by the
next save; those of live processes, of other students and of names kdscale did not make stay.
A finished run's checkpoint is found from Ray Train's record without starting a worker group."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import uuid

from kdscale.processes import host as this_host
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
    host = this_host()
    dead = _folder(student, f"{host}:{_exited_pid()}-abc")
    live = _folder(student, f"{host}:{os.getppid()}-abc")  # another live process: maybe still uploading
    own = _folder(student, f"{host}:{os.getpid()}-old")
    foreign = _folder(student, "notapid")
    other_host = _folder(student, f"{host}x:{_exited_pid()}-abc")  # its pids say nothing about this host's
    # a container with this hostname and temp dir but its own pid namespace: its pids are not ours
    other_namespace = _folder(student, f"{socket.gethostname()}~00000000~1:{_exited_pid()}-abc")
    other_student = _folder(f"{student}-{_exited_pid()}", f"{host}:{_exited_pid()}-abc")  # digits in its name
    try:
        fresh = new_folder(student)
        assert not os.path.exists(dead)
        assert all(os.path.isdir(p) for p in (live, own, foreign, other_host, other_namespace, other_student, fresh))
        assert os.path.basename(fresh).startswith(f"{CHECKPOINT_PREFIX}{student}{OWNER_MARK}{host}:{os.getpid()}-")
        assert sorted(folders(student)) == sorted([live, own, foreign, other_host, other_namespace, fresh])
        assert remove_orphans(student) == []  # nothing else is an orphan
    finally:
        for path in (live, own, foreign, other_host, other_namespace, other_student, fresh):
            subprocess.run(["rm", "-rf", path], check=True)


def test_a_container_with_this_hostname_but_its_own_pid_namespace_judges_none_of_our_folders(monkeypatch):
    """Containers can share a hostname and a temp dir but not pids: the recorded host names the
    kernel's boot and the pid namespace, so a dead pid of ours is not judged (or its folder
    removed) from another namespace, whose pid of that number is some other process."""
    import types

    import kdscale.processes as processes

    ours = processes.host()
    assert ours == f"{socket.gethostname()}~{open('/proc/sys/kernel/random/boot_id').read()[:8]}~" + str(
        os.stat("/proc/self/ns/pid").st_ino
    )
    student = f"ckpt-test-{uuid.uuid4().hex[:8]}"
    dead = _folder(student, f"{ours}:{_exited_pid()}-abc")
    real_stat = os.stat

    def other_namespace(path, *args, **kwargs):
        return types.SimpleNamespace(st_ino=1) if path == "/proc/self/ns/pid" else real_stat(path, *args, **kwargs)

    monkeypatch.setattr(processes.os, "stat", other_namespace)
    processes.host.cache_clear()
    try:
        assert processes.host() != ours and processes.host().startswith(socket.gethostname())
        assert remove_orphans(student) == [] and os.path.isdir(dead)
    finally:
        monkeypatch.undo()
        processes.host.cache_clear()
    assert processes.host() == ours and remove_orphans(student) == [dead]  # back home: ours, and dead


def _run_folder(root, snapshot, state, hf=True):
    """A Ray Train run folder as it stores one checkpoint: its record, kdscale's state, hf/."""
    import json

    run = root / "ray-run"
    folder = run / "checkpoint_2026-12-08_01-00-00.000000"
    folder.mkdir(parents=True)
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    (folder / "kdscale_state.json").write_text(json.dumps(state))
    if hf:
        (folder / "hf").mkdir()
    return folder


def test_a_finished_run_is_found_from_ray_trains_record(tmp_path):
    from kdscale.student.trainer import finished_checkpoint

    snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_2026-12-08_01-00-00.000000"}}
    folder = _run_folder(tmp_path / "done", snapshot, {"epoch": 2, "step": 24})
    found = finished_checkpoint(str(tmp_path / "done"), "ray-run", epochs=2)
    assert found is not None and found.path == str(folder)
    # not finished, not stored whole, or a record of another layout: Ray Train runs (and resumes) it
    _run_folder(tmp_path / "half", snapshot, {"epoch": 1, "step": 12})
    assert finished_checkpoint(str(tmp_path / "half"), "ray-run", epochs=2) is None
    _run_folder(tmp_path / "no-hf", snapshot, {"epoch": 2, "step": 24}, hf=False)
    assert finished_checkpoint(str(tmp_path / "no-hf"), "ray-run", epochs=2) is None
    _run_folder(tmp_path / "other", {"latest": "checkpoint_x"}, {"epoch": 2})
    assert finished_checkpoint(str(tmp_path / "other"), "ray-run", epochs=2) is None
    assert finished_checkpoint(str(tmp_path / "none"), "ray-run", epochs=2) is None
