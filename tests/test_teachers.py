"""Teacher backends: the registry the job spec names, and the generic check that refuses what a
backend cannot serve before any work (a backend returning only top-k log-probs, as a vLLM server
does, cannot feed a kind that draws from the full distribution, nor online students)."""

from __future__ import annotations

import pytest

from kdscale import teachers
from kdscale.config import ConfigError, load_job
from kdscale.prepare import prepare
from kdscale.teachers.base import TOP_K
from kdscale.teachers.hf import HuggingFace
from tests.conftest import write_job


class TopKOnly(HuggingFace):
    """The Hugging Face loader, declared as returning top-k log-probs only."""

    name = "topk-only"
    outputs = frozenset({TOP_K})


@pytest.fixture
def topk_only(monkeypatch):
    monkeypatch.setitem(teachers.BACKENDS, TopKOnly.name, TopKOnly())
    return TopKOnly.name


def test_unknown_backend_is_a_config_error_naming_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"teacher.backend: .*unknown teacher backend 'vllm' \(known: huggingface\)"):
        load_job(write_job(tmp_path, **{"teacher.backend": "vllm"}))


def test_default_backend_serves_every_kind(tmp_path):
    spec = load_job(write_job(tmp_path))
    assert spec.teacher.backend == "huggingface"
    assert teachers.backend(spec.teacher).outputs >= {teachers.FULL_LOGITS, TOP_K}


def test_a_kind_needing_full_logits_is_refused_naming_kind_and_backend(tmp_path, topk_only):
    spec = load_job(write_job(tmp_path, **{"teacher.backend": topk_only}))  # the tiny job: kind sampled
    with pytest.raises(ConfigError) as e:
        prepare(spec)
    want = "cache.targets.kind: target kind sampled needs the teacher's full logits; teacher backend topk-only"
    assert want in str(e.value)


def test_topk_kind_is_served_by_a_topk_backend_but_online_students_are_not(tmp_path, topk_only):
    ok = load_job(write_job(tmp_path, **{"teacher.backend": topk_only, "cache.targets": {"kind": "topk", "k": 4}}))
    assert prepare(ok).spec.teacher.backend == topk_only
    spec = load_job(
        write_job(
            tmp_path,
            **{"teacher.backend": topk_only, "cache.targets": {"kind": "topk", "k": 4}, "students.0.targets": "online"},
        )
    )
    with pytest.raises(ConfigError, match=r"students.0.targets: online targets need the teacher's full logits"):
        prepare(spec)


def test_registry_functions_dispatch_to_the_named_backend(tmp_path, topk_only, monkeypatch):
    calls = []
    monkeypatch.setattr(TopKOnly, "tokenizer", lambda self, spec: calls.append(spec.backend) or "tok")
    spec = load_job(write_job(tmp_path, **{"teacher.backend": topk_only}))
    assert teachers.load_tokenizer(spec.teacher) == "tok" and calls == [topk_only]
