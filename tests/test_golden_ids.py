"""Golden cache_ids: every shipped job's cache_id, computed from its plan (teacher fingerprint,
tokenizer, packed corpus, targets) without running the teacher. A refactor of the cache, the
corpus packing or the fingerprints must leave them unchanged, or users' stored caches stop being
found; a deliberate change bumps the format version and updates these with a reason."""

from __future__ import annotations

import pytest

from kdscale.config import load_job
from kdscale.precompute.plan import build_plan
from kdscale.prepare import prepare
from tests.conftest import JOBS

GOLDEN = {
    "tiny.yaml": "74ca9a8f692a3ea2401642a8901bfe85",
    "quickstart.yaml": "d3ca2acc5290f6f0563c2b251675df93",
    "quality.yaml": "4814463915400daeff5d7bc3aaa02b1c",
}


@pytest.mark.parametrize(
    "job",
    [
        "tiny.yaml",
        pytest.param("quickstart.yaml", marks=pytest.mark.slow),
        pytest.param("quality.yaml", marks=pytest.mark.slow),
    ],
)
def test_shipped_job_cache_id_is_unchanged(job):
    spec = load_job(JOBS / job)
    plan = build_plan(spec, prepare(spec).tokenizer)  # packs the corpus here, no Ray, no teacher pass
    assert plan.cache_id == GOLDEN[job]
