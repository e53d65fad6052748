"""The Python API (kdscale.api, re-exported by ``import kdscale``): overrides, a lazy import, and
the README's example run as written, without MLflow."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys

import pytest

import kdscale
from kdscale.config import ConfigError
from tests.conftest import JOBS, REPO


def test_load_job_applies_overrides_from_a_dict_or_cli_strings():
    spec = kdscale.load_job(JOBS / "tiny.yaml", overrides={"seed": 7, "students.0.train.lr": 1e-4})
    assert spec.seed == 7 and spec.students[0].train.lr == 1e-4
    spec = kdscale.load_job(JOBS / "tiny.yaml", overrides=["cache.targets.kind=topk", "students.0.train.epochs=3"])
    assert spec.cache.targets.kind == "topk" and spec.students[0].train.epochs == 3
    with pytest.raises(ConfigError) as info:
        kdscale.load_job(JOBS / "tiny.yaml", overrides=["students.9.train.lr=1", "no-equals", "seed=-1"])
    fields = [f for f, _ in info.value.problems]
    assert sorted(fields) == ["no-equals", "students.9.train.lr"]  # where to set; values are checked after


def test_import_kdscale_loads_neither_ray_nor_torch():
    code = "import kdscale, sys; print(sorted(m for m in ('ray', 'torch', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.ray
@pytest.mark.slow
def test_readme_example_runs_without_mlflow(ray_session, tmp_path, monkeypatch, capsys):
    shutil.copytree(JOBS, tmp_path / "jobs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    scope: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), scope)
    students, cache = scope["students"], scope["cache"]
    student = students["tiny-student"]
    assert math.isfinite(student.heldout_ce) and student.registered_model is None
    assert (tmp_path / "runs" / "api-example" / "students" / "tiny-student" / "export" / "config.json").exists()
    assert cache.kind == "sampled" and cache.splits["train"] > 0 and len(cache.cache_id) == 32
    assert scope["targets"].ids.shape[:2] == scope["input_ids"].shape
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()
    assert "held-out CE" in capsys.readouterr().out
