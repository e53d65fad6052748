"""kdscale: knowledge distillation at scale.

Run a teacher once into a durable Parquet logit cache, then train many students from it with
Ray Train + DeepSpeed, recording the lineage teacher -> cache -> student in MLflow.
The Python API is :mod:`kdscale.api`, re-exported here (imports are lazy: ``import kdscale``
loads neither Ray nor torch).
"""

from __future__ import annotations

import sys
import types
from typing import Any

__version__ = "0.1.0"

__all__ = [
    "ImportSettings",
    "Imported",
    "JobResult",
    "LogitCache",
    "Report",
    "StudentResult",
    "describe_cache",
    "evaluate",
    "export_cache",
    "follow_job",
    "import_cache",
    "job_logs",
    "job_status",
    "list_jobs",
    "load_job",
    "open_cache",
    "plan",
    "precompute",
    "report",
    "run",
    "run_stages",
    "stop_job",
    "submit_job",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kdscale import api

        return getattr(api, name)
    raise AttributeError(f"module 'kdscale' has no attribute {name!r}")


class _Package(types.ModuleType):
    """``kdscale.precompute`` is the API function, although a subpackage has that name: importing
    ``kdscale.precompute.<module>`` would otherwise bind the subpackage over it (the subpackage
    stays importable by its full name, as every import in kdscale does)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in __all__ and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
