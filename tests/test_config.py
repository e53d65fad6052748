"""Job spec validation: every problem reported at once, each naming its field; nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from kdscale.config import ConfigError, load_job
from tests.conftest import JOBS, write_job


def test_shipped_jobs_are_valid():
    shipped = sorted(JOBS.glob("*.yaml"))
    assert {p.name for p in shipped} >= {"tiny.yaml", "quickstart.yaml", "quality.yaml", "fashion_mnist.yaml"}
    for path in shipped:
        try:
            spec = load_job(path)
        except ConfigError as e:
            # the Fashion-MNIST teacher is trained by benchmarks/fashion_mnist.py before its job runs
            assert path.name == "fashion_mnist.yaml" and [f for f, _ in e.problems] == ["teacher.path"], e
            spec = load_job(path, check_resources=False)
        assert spec.students and spec.teacher.name


def test_relative_paths_resolve_against_the_spec_file(tmp_path):
    spec = load_job(write_job(tmp_path))
    assert spec.teacher.tokenizer == str(tmp_path / "assets" / "tiny-tokenizer")
    assert spec.corpus.paths == [str(tmp_path / "assets" / "tiny-corpus" / "*.rst")]


def test_every_problem_is_listed_with_its_field(tmp_path):
    path = write_job(
        tmp_path,
        **{
            "teacher.batch_size": "four",
            "students.0.train.zero_stag": 2,
            "corpus.paths": [str(tmp_path / "nope" / "*.txt")],
            "teacher.tokenizer": str(tmp_path / "no-tokenizer"),
            "cache.targets.kind": "bogus",
        },
    )
    with pytest.raises(ConfigError) as info:
        load_job(path)
    fields = [f for f, _ in info.value.problems]
    assert "teacher.batch_size" in fields
    assert "students.0.train.zero_stag" in fields
    assert "corpus.paths.0" in fields
    assert "teacher.tokenizer" in fields
    assert "cache.targets.kind" in fields
    message = str(info.value)
    assert "5 problems" in message
    assert "unknown field" in message and "'four'" in message and "no file matches" in message


def test_missing_gguf_file_and_uninstalled_package(tmp_path):
    path = write_job(tmp_path, teacher={"name": "t", "path": "pkg:definitely_not_installed_pkg", "gguf_file": "x.gguf"})
    with pytest.raises(
        ConfigError, match=r"teacher.path: Python package 'definitely_not_installed_pkg' is not installed"
    ):
        load_job(path)
    (tmp_path / "model").mkdir()
    path = write_job(tmp_path, teacher={"name": "t", "path": str(tmp_path / "model"), "gguf_file": "missing.gguf"})
    with pytest.raises(ConfigError, match=r"teacher.gguf_file: no such file: .*missing.gguf"):
        load_job(path)


def test_zero_stage_out_of_range_and_duplicate_students(tmp_path):
    spec = yaml.safe_load((JOBS / "tiny.yaml").read_text())
    student = spec["students"][0]
    spec["students"] = [student, dict(student)]
    spec["students"][1]["train"] = {**student["train"], "zero_stage": 4}
    path = tmp_path / "job.yaml"
    write_job(tmp_path)  # copies assets
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError) as info:
        load_job(path)
    text = str(info.value)
    assert "students.1.train.zero_stage" in text
    assert "student names must be unique" in text


def test_not_a_mapping_and_bad_yaml(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_job(p)
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(p)


def test_cli_refuses_bad_spec_and_writes_nothing(tmp_path):
    path = write_job(tmp_path, **{"students.0.train.zero_stag": 2, "corpus.paths": ["/nonexistent/*.txt"]})
    workdir = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "kdscale.cli", "run", str(path), "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "students.0.train.zero_stag" in proc.stderr and "corpus.paths.0" in proc.stderr
    assert not workdir.exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_unknown_student_architecture_field_fails_before_work(tmp_path):
    from typer.testing import CliRunner

    from kdscale.cli import app

    path = write_job(tmp_path, **{"students.0.architecture.hiden_size": 8})
    workdir = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(path), "--workdir", str(workdir)])
    assert result.exit_code == 2
    assert "students.0.architecture" in result.output and "hiden_size" in result.output
    assert not workdir.exists()


@pytest.mark.parametrize("value", [0, -1, "all", 1.5, True])
def test_parallel_students_is_auto_or_a_positive_count(tmp_path, value):
    with pytest.raises(ConfigError) as info:
        load_job(write_job(tmp_path, parallel_students=value))
    assert info.value.problems == [
        ("parallel_students", f"must be auto or a whole number of students, at least 1 (got {value!r})")
    ]


@pytest.mark.parametrize(("value", "expected"), [(None, "auto"), ("auto", "auto"), (3, 3)])
def test_parallel_students_accepts_auto_and_counts(tmp_path, value, expected):
    overrides = {} if value is None else {"parallel_students": value}
    assert load_job(write_job(tmp_path, **overrides)).parallel_students == expected
