"""A GGUF teacher's tokenizer and config converted once into plain files (kdscale.teachers.gguf_metadata):
the same token ids and config as parsing the GGUF file, reused until the file or transformers
changes, one whole folder when two processes convert at once, and the GGUF read directly when
nothing can be kept."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import pytest

from kdscale.config import load_job
from kdscale.fingerprint import tokenizer_fingerprint
from kdscale.teachers import gguf_metadata
from kdscale.teachers.hf import HuggingFace, teacher_folder
from tests.conftest import JOBS


def _fake_convert(calls: list, pause: float = 0.0):
    def convert(folder, gguf_file, trust_remote_code, into):
        calls.append(into)
        time.sleep(pause)
        with open(os.path.join(into, "config.json"), "w") as f:
            json.dump({"written_by": len(calls)}, f)

    return convert


def test_two_processes_converting_at_once_leave_one_whole_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSCALE_HOME", str(tmp_path / "home"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    calls: list = []
    monkeypatch.setattr(gguf_metadata, "_convert", _fake_convert(calls, pause=0.3))
    found: list = []
    threads = [
        threading.Thread(target=lambda: found.append(gguf_metadata.converted_folder(str(tmp_path), "m.gguf")))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 2 and found[0] == found[1] and found[0] is not None
    assert os.listdir(tmp_path / "home" / "gguf") == [os.path.basename(found[0])]  # no scratch folder left
    assert json.loads((tmp_path / "home" / "gguf" / found[0] / "config.json").read_text())["written_by"] in (1, 2)

    # reused while the file is unchanged; converted again once it changes
    assert gguf_metadata.converted_folder(str(tmp_path), "m.gguf") == found[0] and len(calls) == 2
    stat = os.stat(tmp_path / "m.gguf")
    os.utime(tmp_path / "m.gguf", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    again = gguf_metadata.converted_folder(str(tmp_path), "m.gguf")
    assert again != found[0] and len(calls) == 3


def test_a_failed_conversion_leaves_nothing_and_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSCALE_HOME", str(tmp_path / "home"))
    (tmp_path / "m.gguf").write_bytes(b"not gguf")

    def broken(folder, gguf_file, trust_remote_code, into):
        (tmp_path / "home" / "gguf").joinpath(os.path.basename(into), "tokenizer.json").write_text("{")
        raise ValueError("not a GGUF file")

    monkeypatch.setattr(gguf_metadata, "_convert", broken)
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_metadata.converted_folder(str(tmp_path), "m.gguf")
    assert os.listdir(tmp_path / "home" / "gguf") == []


def test_an_unwritable_home_reads_the_gguf_directly(tmp_path, monkeypatch):
    (tmp_path / "home").write_text("a file, not a folder")
    monkeypatch.setenv("KDSCALE_HOME", str(tmp_path / "home"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(gguf_metadata, "_convert", _fake_convert([]))
    assert gguf_metadata.converted_folder(str(tmp_path), "m.gguf") is None
    assert gguf_metadata.converted_folder(str(tmp_path), "absent.gguf") is None


@pytest.mark.slow
def test_smollm2_converted_once_gives_the_same_ids_and_config(tmp_path, monkeypatch):
    """The real SmolLM2 GGUF: the converted tokenizer is the GGUF's (same backend JSON, so the same
    fingerprint and cache_id; same ids on Python docs) and so is the config; later loads read
    the converted files only."""
    from transformers import AutoConfig, AutoTokenizer

    monkeypatch.setenv("KDSCALE_HOME", str(tmp_path / "home"))
    spec = load_job(JOBS / "quickstart.yaml").teacher
    shutil.copy(os.path.join(teacher_folder(spec), spec.gguf_file), tmp_path / spec.gguf_file)
    spec = spec.model_copy(update={"path": str(tmp_path)})
    parsed_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=spec.gguf_file)
    parsed_cfg = AutoConfig.from_pretrained(str(tmp_path), gguf_file=spec.gguf_file)

    backend = HuggingFace()
    tok, cfg = backend.tokenizer(spec), backend.config(spec, len(parsed_tok))
    assert len(os.listdir(tmp_path / "home" / "gguf")) == 1
    assert json.loads(tok.backend_tokenizer.to_str()) == json.loads(parsed_tok.backend_tokenizer.to_str())
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(parsed_tok)
    text = open("/usr/share/doc/python3.11/html/_sources/library/os.rst.txt").read()[:20_000]
    assert tok(text)["input_ids"] == parsed_tok(text)["input_ids"]
    assert (tok.eos_token_id, tok.bos_token_id, len(tok)) == (parsed_tok.eos_token_id, parsed_tok.bos_token_id, 49152)
    ours, theirs = cfg.to_dict(), parsed_cfg.to_dict()
    assert {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)} <= {"_name_or_path"}

    def no_parse(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed again")

    monkeypatch.setattr(gguf_metadata, "_convert", no_parse)
    assert tokenizer_fingerprint(backend.tokenizer(spec)) == tokenizer_fingerprint(tok)
    assert backend.config(spec, len(tok)).to_dict() == cfg.to_dict()
