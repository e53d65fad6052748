"""Issue 13's weak spots, table-driven: each bad input gets a clear message and an exit code before
any work (2: the spec or its inputs; 1: a cache or model file that cannot be used), never a
traceback, and nothing is written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdscale.cli import app
from tests.conftest import write_job


def _spec_text(text: bytes) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        path = tmp / "bad.yaml"
        path.write_bytes(text)
        return ["run", str(path), "--dry-run"]

    return setup


def _job(command: str, *extra: str, **overrides) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        return [command, str(write_job(tmp, **overrides)), *extra]

    return setup


def _gguf_teacher(data: bytes) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        folder = tmp / "teacher"
        folder.mkdir()
        (folder / "model.gguf").write_bytes(data)
        return [
            "run",
            str(
                write_job(
                    tmp,
                    teacher={
                        "name": "t",
                        "path": str(folder),
                        "gguf_file": "model.gguf",
                        "tokenizer": "assets/tiny-tokenizer",
                    },
                )
            ),
            "--dry-run",
        ]

    return setup


def _hf_teacher(config: dict, weights: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        import torch
        from safetensors.torch import save_file

        folder = tmp / "teacher"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
        if weights.endswith(".safetensors"):
            save_file({"w": torch.zeros(2)}, str(folder / weights))
        else:
            (folder / weights).write_bytes(b"\x80\x04not really a pickle")
        return [
            "run",
            str(write_job(tmp, teacher={"name": "t", "path": str(folder), "tokenizer": "assets/tiny-tokenizer"})),
            "--dry-run",
        ]

    return setup


def _workdir_is_a_file(tmp: Path) -> list[str]:
    (tmp / "wfile").write_text("x")
    return ["run", str(write_job(tmp)), "--workdir", str(tmp / "wfile"), "--dry-run"]


def _cache_is_a_file(tmp: Path) -> list[str]:
    (tmp / "cfile").write_text("x")
    return ["run", str(write_job(tmp, **{"cache.uri": str(tmp / "cfile")})), "--dry-run"]


def _cache_is_the_workdir(tmp: Path) -> list[str]:
    return ["run", str(write_job(tmp, workdir=str(tmp / "w"), **{"cache.uri": str(tmp / "w")})), "--dry-run"]


def _other_jobs_workdir(tmp: Path) -> list[str]:
    (tmp / "w").mkdir()
    (tmp / "w" / "summary.json").write_text(json.dumps({"job": "someone-else"}))
    return ["run", str(write_job(tmp)), "--workdir", str(tmp / "w")]


def _unreachable_s3(tmp: Path) -> list[str]:
    return ["cache", "inspect", "s3://no-such-bucket/cache"]


BOMB = b'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + b"".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n".encode() for p, n in zip("abcde", "bcdef")
)

CASES = {
    "non-UTF-8 spec": (_spec_text(b"name: caf\xe9\n"), 2, "not UTF-8"),
    "duplicate YAML keys": (_spec_text(b"name: a\nname: b\n"), 2, "duplicate key 'name'"),
    "YAML alias bomb": (_spec_text(BOMB), 2, "alias bomb"),
    "seed beyond 64 bits": (_job("run", "--dry-run", seed=2**64), 2, "seed"),
    "heads do not divide hidden": (
        _job(
            "run",
            "--dry-run",
            **{"students.0.architecture.num_attention_heads": 3, "students.0.architecture.num_key_value_heads": 1},
        ),
        2,
        "not a multiple of the number of attention heads",
    ),
    "random teacher architecture typo": (
        _job("run", "--dry-run", **{"teacher.architecture.hiden_size": 8}),
        2,
        "teacher.architecture: unknown llama config field(s): hiden_size",
    ),
    "GGUF truncated after a good magic": (
        _gguf_teacher(b"GGUF" + (3).to_bytes(4, "little") + b"\x05" * 40),
        2,
        "corrupt weights file",
    ),
    "auto_map without trust_remote_code": (
        _hf_teacher({"auto_map": {"AutoModelForCausalLM": "m.M"}}, "model.safetensors"),
        2,
        "needs custom model code",
    ),
    "pickle-only weights": (_hf_teacher({}, "pytorch_model.bin"), 2, "only pickle weights"),
    "workdir is a file": (_workdir_is_a_file, 2, "is a file, not a folder"),
    "cache.uri is a file": (_cache_is_a_file, 2, "cache.uri"),
    "cache folder is the workdir": (_cache_is_the_workdir, 2, "is also the workdir"),
    "workdir of another job": (_other_jobs_workdir, 2, "holds the outputs of job 'someone-else'"),
    "loss temperature the sampled cache cannot serve (text rows not known yet)": (
        _job("run", "--dry-run", **{"students.0.loss.temperature": 2.0}),
        2,
        "students.0.loss.temperature: 2.0 differs from the cache's capture temperature 1.0",
    ),
    "train --dry-run opens the cache": (_job("train", "--dry-run"), 1, "incomplete cache"),
    "eval with no export": (_job("eval"), 2, "has no export"),
    "cache inspect on an unreachable endpoint": (_unreachable_s3, 1, "cannot read the cache"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_weak_spot_is_refused_before_work(case, tmp_path, mlflow_uri, monkeypatch):
    setup, code, expected = CASES[case]
    if case == "cache inspect on an unreachable endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # the session's moto endpoint wins otherwise
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # an instance cached by earlier tests points at the moto endpoint
    monkeypatch.chdir(tmp_path)
    args = setup(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code, (case, result.output, result.exception)
    assert expected in " ".join(result.output.split()), (case, result.output)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "runs").exists() and sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize(
    "case, corpus, expected",
    [
        (
            "JSONL line without the field",
            b'{"text": "fine"}\n{"title": "no text"}\n',
            "docs.jsonl:2: no string field 'text'",
        ),
        ("mostly not UTF-8", bytes(range(128, 256)) * 40, "are not UTF-8"),
    ],
)
def test_bad_corpus_is_refused_with_its_file_and_line(ray_session, case, corpus, expected, tmp_path, mlflow_uri):
    name = "docs.jsonl" if case.startswith("JSONL") else "docs.txt"
    (tmp_path / name).write_bytes(corpus)
    job = write_job(
        tmp_path,
        **{"corpus.paths": [str(tmp_path / name)], "corpus.format": "jsonl" if name.endswith("jsonl") else "text"},
    )
    result = CliRunner().invoke(app, ["run", str(job), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2 and expected in " ".join(result.output.split()), result.output
    assert isinstance(result.exception, SystemExit) and not (tmp_path / "w").exists()  # our message, no traceback


@pytest.mark.ray
@pytest.mark.slow
def test_batch_larger_than_the_data_is_refused_before_the_precompute(ray_session, tmp_path, mlflow_uri):
    job = write_job(tmp_path, **{"students.0.train.micro_batch_size": 10_000})
    result = CliRunner().invoke(app, ["run", str(job), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2 and "too few" in result.output, result.output
    assert not (tmp_path / "w").exists()
