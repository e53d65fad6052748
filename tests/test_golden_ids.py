"""Golden cache_ids: every shipped job's cache_id, computed from its plan (teacher fingerprint,
tokenizer, the corpus's input units, targets) without reading the corpus or running the teacher.
A refactor of the cache, the units or the fingerprints must leave them unchanged, or users' stored
caches stop being found; a deliberate change bumps the format version and updates these with a
reason (format 2: the cache_id is over the units' descriptors, so it is known before any read).

A unit's descriptor holds each file's size and modification time (an etag on object stores), so
the tiny job's files, whose times a git checkout sets, get fixed times here; the Debian
python3.11-doc files keep the package's."""

from __future__ import annotations

import os
import shutil

import pytest

from kdscale.config import load_job
from kdscale.precompute.plan import build_plan
from kdscale.prepare import prepare
from tests.conftest import JOBS

GOLDEN = {
    "tiny.yaml": "632a086564efb6d1504516e814a27b65",
    "quickstart.yaml": "ab074de9a9140edf82d18820b52ba734",
    "quality.yaml": "4ee0461ef969ae2618105938cc71b8ee",
}
FIXED_MTIME = 1_700_000_000


def _cache_id(job, prepared_config: bool = True) -> str:
    """As the pipeline plans it (with the teacher config prepare loaded), or with the plan
    loading the config itself: file metadata only, no read, no Ray."""
    spec = load_job(job)
    p = prepare(spec)
    return build_plan(spec, p.tokenizer, teacher_config=p.teacher_config if prepared_config else None).cache_id


def _tiny_with_fixed_times(tmp_path, name="jobs"):
    jobs = tmp_path / name
    shutil.copytree(JOBS, jobs)
    for f in (jobs / "assets" / "tiny-corpus").iterdir():
        os.utime(f, (FIXED_MTIME, FIXED_MTIME))
    return jobs / "tiny.yaml"


@pytest.mark.parametrize("job", ["tiny.yaml", "quickstart.yaml", "quality.yaml"])
def test_shipped_job_cache_id_is_unchanged(job, tmp_path):
    path = _tiny_with_fixed_times(tmp_path) if job == "tiny.yaml" else JOBS / job
    assert _cache_id(path) == GOLDEN[job]


def test_cache_id_follows_the_files_not_the_folder(tmp_path):
    """The same files (times kept) in another folder name the same cache; a touched or grown file
    names another."""
    here, there = _tiny_with_fixed_times(tmp_path, "a"), _tiny_with_fixed_times(tmp_path, "b")
    assert _cache_id(here) == _cache_id(there) == _cache_id(there, prepared_config=False) == GOLDEN["tiny.yaml"]
    first = sorted((there.parent / "assets" / "tiny-corpus").glob("*.rst"))[0]
    os.utime(first, (FIXED_MTIME + 1, FIXED_MTIME + 1))
    touched = _cache_id(there)
    with open(first, "a") as f:
        f.write("\nmore text\n")
    os.utime(first, (FIXED_MTIME, FIXED_MTIME))
    assert len({GOLDEN["tiny.yaml"], touched, _cache_id(there)}) == 3
