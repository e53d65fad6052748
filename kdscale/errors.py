"""Finding kdscale's own error inside the wrappers Ray puts around an exception raised in a task,
actor or training worker, so the CLI can print its one-line message instead of a traceback."""

from __future__ import annotations


def find_in_chain(error: BaseException, names: tuple[str, ...]) -> BaseException | None:
    """The first exception in ``error``'s chain (``cause`` of Ray's task errors, each worker's
    error of Ray Train's ``worker_failures``, ``__cause__``, ``__context__``) whose class is exactly
    one of ``names``. Ray also builds twin classes such as
    ``RayTaskError(NonFiniteLoss)`` whose text is a whole traceback; those are skipped for the original."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e).__name__ in names:
            return e
        stack += [e.__context__, e.__cause__, getattr(e, "cause", None)]
        stack += list((getattr(e, "worker_failures", None) or {}).values())  # Ray Train's WorkerGroupError
    return None
