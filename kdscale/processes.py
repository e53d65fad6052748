"""Whether a process recorded as the owner of something (a cache lease, an MLflow run, a node's
checkpoint folder) still lives, and which host it was recorded on."""

from __future__ import annotations

import functools
import os
import socket


@functools.cache
def host() -> str:
    """This host as owners are recorded: ``<hostname>~<boot id>~<pid namespace>``.

    A pid only means something to the kernel and pid namespace that issued it, and a hostname
    alone does not name those: containers (or machines) can share a hostname and a temp dir or
    a cache folder while their processes cannot see each other's. Checking such a pid here could
    call a live owner dead and take over (or delete) what it still uses, so a recorded pid is
    checked only where ``host()`` equals the recorded one. Where /proc is absent (macOS) it is
    the hostname alone."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip()[:8])
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        return parts[0]
    return "~".join(parts)


def alive(pid: object) -> bool:
    """Whether a process with this pid exists on this host (a pid that is not a number: no)."""
    try:
        os.kill(int(str(pid)), 0)  # signal 0: existence check only
    except (ValueError, OverflowError, ProcessLookupError):
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True
