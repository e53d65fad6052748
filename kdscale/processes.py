"""Whether a process recorded as the owner of something (a cache lease, an MLflow run) still lives."""

from __future__ import annotations

import os


def alive(pid: object) -> bool:
    """Whether a process with this pid exists on this host (a pid that is not a number: no)."""
    try:
        os.kill(int(str(pid)), 0)
    except (ValueError, OverflowError, ProcessLookupError):
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True
