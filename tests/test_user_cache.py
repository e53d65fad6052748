"""A teacher's weight-file hashes remembered per file version (kdscale.user_cache): the same
value as reading the file, not read again while the file is unchanged, read again once its
content changes even with size and modification time put back."""

from __future__ import annotations

import hashlib
import os

import pytest

from kdscale import fs, user_cache


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSCALE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _reads(monkeypatch) -> list[str]:
    reads: list[str] = []
    real = fs.sha256

    def counted(uri):
        reads.append(uri)
        return real(uri)

    monkeypatch.setattr(fs, "sha256", counted)
    return reads


def test_a_hash_is_read_once_per_file_version(home, tmp_path, monkeypatch):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 4096)
    reads = _reads(monkeypatch)
    first = user_cache.file_sha256(str(weights))
    assert first == hashlib.sha256(b"a" * 4096).hexdigest() and len(reads) == 1
    assert user_cache.file_sha256(str(weights)) == first and len(reads) == 1  # remembered

    stat = weights.stat()
    weights.write_bytes(b"b" * 4096)  # same size ...
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the old mtime put back
    assert user_cache.file_sha256(str(weights)) == hashlib.sha256(b"b" * 4096).hexdigest() and len(reads) == 2


def test_files_hash_is_the_teacher_fingerprint_formula(home, tmp_path):
    files = []
    for name, content in (("a.safetensors", b"x"), ("b.safetensors", b"y")):
        (tmp_path / name).write_bytes(content)
        files.append(str(tmp_path / name))
    expected = hashlib.sha256("".join(hashlib.sha256(c).hexdigest() for c in (b"x", b"y")).encode()).hexdigest()
    assert user_cache.files_sha256(files) == expected == user_cache.files_sha256(files)


def test_a_corrupt_record_or_an_unwritable_home_only_costs_a_read(home, tmp_path, monkeypatch):
    weights = tmp_path / "w.gguf"
    weights.write_bytes(b"GGUF" * 10)
    value = user_cache.file_sha256(str(weights))
    (record,) = (home / "sha256").iterdir()
    record.write_text("{not json")
    reads = _reads(monkeypatch)
    assert user_cache.file_sha256(str(weights)) == value and len(reads) == 1
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the home folder would be")
    monkeypatch.setenv("KDSCALE_HOME", str(blocked))
    assert user_cache.file_sha256(str(weights)) == value and len(reads) == 2
