"""Faults around the cache: a killed precompute resumes to the identical cache; corrupted,
incomplete or foreign-tokenizer caches are refused before any training starts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from typer.testing import CliRunner

from kdscale import fs
from kdscale.cache.format import LEDGER_DIR, MANIFEST
from kdscale.cache.reader import open_manifest
from kdscale.cli import app
from tests.conftest import cli_in_subprocess, write_job

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _shards(cache) -> dict[str, str]:
    m = open_manifest(str(cache))
    return {s.path: s.sha256 for s in m.shards}


def test_killed_precompute_resumes_to_the_identical_cache(ray_session, tmp_path, mlflow_uri):
    # several input units (8 KiB each), the slice ending inside one of them
    job = write_job(tmp_path, **{"cache.rows_per_shard": 4, "corpus.max_tokens": 16384, "corpus.unit_bytes": 8192})
    killed = tmp_path / "killed"
    proc = cli_in_subprocess(
        ray_session, tmp_path, "precompute", str(job), "--workdir", str(killed), stderr=subprocess.PIPE
    )
    ledger = killed / "cache" / LEDGER_DIR
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        # only committed entries: a ledger entry is written to a temp name first, then renamed
        if (
            ledger.exists()
            and len([p for p in os.listdir(ledger) if p.startswith("train-") and p.endswith(".json")]) >= 3
        ):
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"precompute ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "cache" / MANIFEST).exists()
    finished = {
        p.replace(".json", ".parquet")
        for p in os.listdir(ledger)
        if p.endswith(".json") and p not in ("plan.json", "lease.json")
    }
    assert len(finished) >= 3
    mtimes = {p: (killed / "cache" / p).stat().st_mtime_ns for p in finished}

    with pytest.raises(Exception, match="incomplete cache"):
        open_manifest(str(killed / "cache"))
    # the dry run says what a rerun will do with it
    preview = _dry_run_preview(job, killed)
    assert preview["cache"].startswith(f"unfinished: resumed, {len(finished)} shards already finished, ")
    assert preview["units"] > 1
    # what a writer killed mid-write leaves (the kill may or may not have caught one)
    (killed / "cache" / "train-09999.parquet.tmp-4242").write_bytes(b"half a shard")
    (ledger / "train-09999.json.tmp-4242").write_text("{")

    resumed = CliRunner().invoke(app, ["precompute", str(job), "--workdir", str(killed)])
    assert resumed.exit_code == 0, resumed.output
    leftovers = [p.name for p in (killed / "cache").rglob("*") if ".tmp-" in p.name]
    assert leftovers == [] and "temp file(s) left by an interrupted run" in " ".join(resumed.output.split())
    m = open_manifest(str(killed / "cache"))
    assert len(finished) < len(m.shards) and len(m.dataset.units) > 1
    assert f"{len(finished)} shards already finished" in " ".join(resumed.output.split())
    assert {p: (killed / "cache" / p).stat().st_mtime_ns for p in finished} == mtimes  # not recomputed
    assert _dry_run_preview(job, killed) == {**preview, "cache": "committed: reused, no teacher work"}
    assert preview["cache_id"] == m.cache_id

    clean = tmp_path / "clean"
    result = CliRunner().invoke(app, ["precompute", str(job), "--workdir", str(clean)])
    assert result.exit_code == 0, result.output
    assert open_manifest(str(killed / "cache")).cache_id == open_manifest(str(clean / "cache")).cache_id
    assert _shards(killed / "cache") == _shards(clean / "cache")


def _dry_run_preview(job, workdir) -> dict:
    dry = CliRunner().invoke(app, ["precompute", str(job), "--workdir", str(workdir), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    return json.loads(dry.output)["precompute"]


def test_dry_run_of_a_reused_cache_refuses_a_batch_larger_than_its_training_rows(committed, tmp_path):
    """With the cache committed at its URI the training rows are known: the dry run refuses a
    batch the run would refuse (it passed before), and passes the job's own batch."""
    job, workdir = committed
    dry = ["run", str(job), "--workdir", str(workdir), "--dry-run"]
    assert CliRunner().invoke(app, dry).exit_code == 0
    big = write_job(tmp_path, **{"students.0.train.micro_batch_size": 10_000})
    result = CliRunner().invoke(app, ["run", str(big), "--workdir", str(workdir), "--dry-run"])
    assert result.exit_code == 2 and "training rows are too few" in result.output, result.output


def _copy(committed, tmp_path):
    job, workdir = committed
    target = tmp_path / "w"
    shutil.copytree(workdir / "cache", target / "cache")
    return job, target


def test_flipped_byte_named_by_verify_and_training_refuses(committed, tmp_path, mlflow_uri):
    job, work = _copy(committed, tmp_path)
    m = open_manifest(str(work / "cache"))
    victim = work / "cache" / m.shards[2].path
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x01
    victim.write_bytes(bytes(data))

    verify = CliRunner().invoke(app, ["cache", "verify", str(work / "cache")])
    assert verify.exit_code == 1
    assert m.shards[2].path in verify.output and "1 problem" in verify.output and "sha256" in verify.output

    train = CliRunner().invoke(app, ["train", str(job), "--workdir", str(work)])
    assert train.exit_code == 1
    assert "refusing the cache" in train.output and m.shards[2].path in "".join(train.output.split())
    assert not (work / "students").exists()


def test_altered_token_bytes_are_named_by_verify(committed, tmp_path):
    """The teacher vocabulary's bytes (what students with their own tokenizer align by) are checked
    like every other file of the cache."""
    _, work = _copy(committed, tmp_path)
    m = open_manifest(str(work / "cache"))
    assert m.alignment and m.alignment["token_bytes"] == "token_bytes.parquet"
    victim = work / "cache" / "token_bytes.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    verify = CliRunner().invoke(app, ["cache", "verify", str(work / "cache")])
    assert verify.exit_code == 1
    assert "token_bytes.parquet does not match its sha256" in " ".join(verify.output.split())
    victim.unlink()
    verify = CliRunner().invoke(app, ["cache", "verify", str(work / "cache")])
    assert verify.exit_code == 1 and "token_bytes.parquet is missing" in " ".join(verify.output.split())


def test_deleted_manifest_is_an_incomplete_cache(committed, tmp_path, mlflow_uri):
    job, work = _copy(committed, tmp_path)
    (work / "cache" / MANIFEST).unlink()
    for args in (["train", str(job), "--workdir", str(work)], ["cache", "inspect", str(work / "cache")]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1
        assert "incomplete cache" in result.output
    assert not (work / "students").exists()


def test_student_with_another_tokenizer_is_refused_before_training(committed, tmp_path, mlflow_uri):
    from transformers import AutoTokenizer

    job, work = _copy(committed, tmp_path)
    spec_dir = job.parent
    tok = AutoTokenizer.from_pretrained(spec_dir / "assets" / "tiny-tokenizer")
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(tmp_path / "other-tokenizer")
    other = write_job(tmp_path, **{"teacher.tokenizer": str(tmp_path / "other-tokenizer")})
    m = open_manifest(str(work / "cache"))
    result = CliRunner().invoke(app, ["train", str(other), "--workdir", str(work)])
    assert result.exit_code == 1
    text = "".join(result.output.split())
    assert "tokenizermismatch" in text and m.tokenizer.fingerprint in text and "vocab513" in text
    assert not (work / "students").exists()


def test_precompute_refuses_to_overwrite_another_cache(committed, tmp_path, mlflow_uri):
    job, work = _copy(committed, tmp_path)
    other = write_job(tmp_path, **{"seed": 7})
    for dry_run in ([], ["--dry-run"]):  # the dry run refuses it as the run does
        result = CliRunner().invoke(app, ["precompute", str(other), "--workdir", str(work), *dry_run])
        assert result.exit_code == 1
        assert "already holds another cache" in " ".join(result.output.split())
    assert (
        json.loads((work / "cache" / MANIFEST).read_text())["cache_id"] == open_manifest(str(work / "cache")).cache_id
    )
    assert fs.exists(str(work / "cache" / MANIFEST))


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_write_that_fails_midway_publishes_nothing(store, tmp_path, request):
    """fs.open_for_write publishes a file only when its block ends cleanly (an export's JSONL,
    written line by line, is never read half-written): on a disk a failed writer leaves neither
    the file nor its temp file; an object store, which publishes an object when its file closes,
    gets the failed upload discarded. A clean block publishes the file whole."""
    import gc

    folder = str(tmp_path / "out") if store == "local" else request.getfixturevalue("s3_bucket")
    dest = fs.join(folder, "train-00000.jsonl")
    with pytest.raises(RuntimeError, match="killed"):
        with fs.open_for_write(dest) as f:
            f.write(b'{"input_ids":[1]}\n' * 1000)
            raise RuntimeError("killed mid-export")
    gc.collect()  # (a dropped fsspec file closes, and so uploads, when collected)
    assert not fs.exists(dest)
    if store == "local":
        assert os.listdir(folder) == []
    with fs.open_for_write(dest) as f:
        f.write(b"a\n")
        f.write(b"b\n")
    assert fs.read_bytes(dest) == b"a\nb\n"
    if store == "local":
        assert os.listdir(folder) == ["train-00000.jsonl"]
