"""A job end to end: prepare (validate everything, write nothing) -> precompute -> train -> eval ->
export, with MLflow runs and ``summary.json`` in the workdir.

Stages can run alone (``kdscale precompute|train|eval``); each reads what the previous one left
(the committed cache, the exported students) and merges its part into ``summary.json``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from kdscale import fs
from kdscale.cache.format import Manifest
from kdscale.config import JobSpec
from kdscale.prepare import (
    Prepared,
    check_cache_slot,
    check_cluster,
    check_exports,
    check_student_plan,
    check_workdir,
    describe_plan,
    open_cache_for_students,
    prepare,
    uses_cache,
)
from kdscale.progress import say
from kdscale.resources import students_at_once
from kdscale.sources import Sources
from kdscale.stages import STAGES
from kdscale.summary import cache_summary, log_report, read_summary, write_report, write_summary
from kdscale.tracking.lineage import (
    NullTracker,
    Tracker,
    check_reachable,
    tracking_uri,
)
from kdscale.tracking.redact import redact_text
from kdscale.train_stage import stage_eval, stage_train


def dry_run(spec: JobSpec, stages: tuple[str, ...], workdir: str | None = None) -> dict[str, Any]:
    """Every check a real run makes before work that needs no teacher pass (the spec, files,
    resources, the cache slot, the students' batches against the training rows where they are
    known, and for train/eval the committed cache), and the plan; writes nothing."""
    p = prepare(spec, workdir)
    check_workdir(p)
    cap = check_cluster(spec, stages)
    plan = describe_plan(p)
    plan["stages"] = list(stages)
    if "train" in stages:
        plan["students_train"] = students_at_once(spec, cap)
    if "precompute" in stages and uses_cache(spec):
        plan["precompute"] = precompute_preview(p, training="train" in stages)
    elif uses_cache(spec):
        m = open_cache_for_students(p, verify_checksums=False)
        if "train" in stages:
            check_student_plan(spec, m.targets, m.dataset.rows["train"])
        Sources(manifest=m).tasks(p)  # students with their own tokenizer: alignment data and fraction
        plan["cache"] = cache_summary(p.cache_uri, m)
    return plan


def precompute_preview(p: Prepared, training: bool) -> dict[str, Any]:
    """What the precompute stage would do: the cache_id it makes, and whether that cache is
    already committed at the URI (reused: no teacher work), begun (resumed: the finished units or
    shards are kept) or absent (computed); a slot holding another job's cache is refused here as
    a run refuses it, and (``training``) students whose batches do not fit the training rows
    where those are known without packing the corpus: a committed cache's, an image plan's.
    Reads the ledger, not the shards (a run checks their checksums)."""
    from kdscale.cache.writer import check_claim, finished_shards, recorded_units

    plan = plan_precompute(p)
    total = len(plan.units) if plan.streamed else len(plan.tasks)
    preview: dict[str, Any] = {"cache_id": plan.cache_id, "units" if plan.streamed else "shards": total}
    reuse = check_cache_slot(p, plan.cache_id, checksums=False)  # the run's own refusals
    if training:
        check_student_plan(p.spec, plan.targets, _train_rows(plan, reuse, stream=None))
    if reuse is not None:
        preview["cache"] = "committed: reused, no teacher work"
    elif check_claim(p.cache_uri, plan.cache_id):
        shards = len(finished_shards(p.cache_uri, verify=False))
        packed = f", {len(recorded_units(p.cache_uri))} of {total} input units packed" if plan.streamed else ""
        preview["cache"] = f"unfinished: resumed, {shards} shards already finished{packed}"
    else:
        preview["cache"] = "absent: computed"
    return preview


def plan_precompute(p: Prepared):
    """The precompute plan: for text from the corpus's file metadata alone (its units name the
    cache), for images from their IDX files. Reads only; raises PlanError/ConfigError."""
    from kdscale.precompute.plan import build_plan

    return build_plan(p.spec, p.tokenizer, token_bytes=p.vocabulary_bytes(), teacher_config=p.teacher_config)


def start_stream(p: Prepared, plan):
    """Start packing the text corpus's units on Ray and wait for the first ones (the id-coding
    sample); when they are the whole corpus, refuse one without train / held-out rows now,
    before any teacher work, workdir or MLflow run."""
    from kdscale.precompute.feed import begin_stream
    from kdscale.precompute.plan import check_rows
    from kdscale.ray_runtime import ensure_ray

    ensure_ray(p.spec.ray)
    stream = begin_stream(p.spec, p.tokenizer, plan.units, plan.tokenizer.vocab_size)
    if stream.complete:
        check_rows(stream.sample_rows(), sum(m.documents for m, _ in stream.sample), p.spec.corpus)
    return stream


def stage_precompute(p: Prepared, tracker: Tracker, plan, reuse: Manifest | None = None, stream=None) -> Manifest:
    from kdscale.precompute.runner import run_precompute
    from kdscale.ray_runtime import ensure_ray

    spec = p.spec
    run_id = tracker.start_child("precompute", "precompute")
    try:
        tracker.log_params(
            run_id,
            {
                "teacher": spec.teacher.name,
                "teacher_fingerprint": plan.teacher.fingerprint,
                "tokenizer_fingerprint": plan.tokenizer.fingerprint,
                "dataset_fingerprint": plan.data_fingerprint,
                "target_kind": plan.targets.kind,
                "num_samples": plan.targets.num_samples,
                "k": plan.targets.k,
                "capture_temperature": plan.targets.temperature,
                "seq_len": spec.corpus.seq_len,
                "replicas": spec.teacher.replicas,
                "shards": spec.teacher.shards,
                "cache_uri": p.cache_uri,
            },
        )
        ensure_ray(spec.ray)
        result = run_precompute(spec, plan, p.cache_uri, reuse, stream)
        m = result.manifest
        tracker.log_metrics(
            run_id,
            {
                "tokens": m.totals["tokens"],
                "bytes_per_token": m.totals["bytes_per_token"],
                "target_bytes_per_token": m.totals["target_bytes_per_token"],
                "tokens_per_second": result.tokens_per_second or None,
                "seconds": result.seconds,
                "teacher_heldout_ce": m.totals["teacher_heldout_ce"],
                "reused": float(result.reused),
            },
        )
        tracker.log_cache(run_id, m, p.cache_uri, context="output")
        tracker.log_manifest(run_id, m)
        log_cache_profile(tracker, run_id, p.cache_uri, m)
        tracker.end(run_id)
    except BaseException:
        tracker.end(run_id, "FAILED")
        raise
    speed = {
        "tokens": result.tokens_computed,
        "seconds": result.compute_seconds,
        "tokens_per_second": result.tokens_per_second,
    }
    write_summary(
        p.workdir,
        {
            "cache": cache_summary(p.cache_uri, m, result.reused),
            "precompute": speed,  # this run's teacher work (0 tokens when the cache was reused)
            "mlflow": {"precompute_run_id": run_id},
        },
    )
    return m


def log_cache_profile(tracker: Tracker, run_id: str, cache_uri: str, m: Manifest) -> None:
    from kdscale.cache.profile import profile
    from kdscale.tracking import plots

    prof = profile(cache_uri, m)
    title = f"cache {m.cache_id[:8]}: {m.targets.kind}"
    tracker.log_figure(
        run_id,
        plots.cache_profile(prof.ids_per_position, prof.tail_mass, prof.teacher_nll_per_token, title),
        "plots/cache_profile.png",
    )


def _train_rows(plan, reuse: Manifest | None, stream) -> int | None:
    """Training rows, where known before the teacher runs (None: a text corpus not packed yet,
    or past the stream's sample)."""
    if reuse is not None:
        return reuse.dataset.rows["train"]
    if stream is not None:
        return stream.sample_rows()["train"] if stream.complete else None
    return None if plan.streamed else plan.dataset.rows["train"]


@dataclass
class PrecomputeWork:
    """What the precompute stage will do: the plan, and either the committed cache it reuses or
    the corpus stream it already started (streamed plans), or neither (a teacher pass to come)."""

    plan: Any
    reuse: Manifest | None = None
    stream: Any = None


def run(
    spec: JobSpec, stages: tuple[str, ...] = STAGES, workdir: str | None = None, tracking: bool = True
) -> dict[str, Any]:
    """Run the given stages in order; returns the merged summary.

    Everything that can refuse the job (the spec, the teacher's files, a corpus that yields no
    sequences, an unusable cache) is checked before the workdir or any MLflow run is created.
    The cache is only computed and read when some student trains from it; online students read
    the packed corpus and run the teacher themselves."""
    p = prepare(spec, workdir)
    check_before_work(p, stages, tracking)
    started = time.perf_counter()
    work = plan_work(p, stages)
    sources = student_sources(p, stages, precomputing=work is not None)
    fs.makedirs(p.workdir)
    tracker = Tracker(spec) if tracking else NullTracker(spec)
    command = "run" if stages == STAGES else "+".join(stages)
    parent = start_job(p, tracker, command, tracking)
    try:
        run_stages(p, tracker, stages, work, sources)
        if "train" in stages or "eval" in stages:
            write_report(read_summary(p.workdir))
            if parent is not None:
                log_report(p.workdir, tracker.uri, parent)
        tracker.end(parent)
    except BaseException:
        tracker.end(parent, "FAILED")
        raise
    return write_summary(p.workdir, {"seconds": {command: time.perf_counter() - started}})


def check_before_work(p: Prepared, stages: tuple[str, ...], tracking: bool) -> None:
    """The workdir, the exports an eval-only run reads, the tracking server, the cluster."""
    check_workdir(p)
    if "eval" in stages and "train" not in stages:
        check_exports(p)
    if tracking:
        check_reachable(tracking_uri(p.spec))
    check_cluster(p.spec, stages)


def plan_work(p: Prepared, stages: tuple[str, ...]) -> PrecomputeWork | None:
    """The precompute to run (None: no stage asks for it, or no student reads a cache), with the
    students' batches checked against its training rows where they are known before the teacher
    runs."""
    if "precompute" not in stages or not uses_cache(p.spec):
        return None
    plan = plan_precompute(p)
    work = PrecomputeWork(plan, reuse=check_cache_slot(p, plan.cache_id))
    if work.reuse is None and plan.streamed:
        work.stream = start_stream(p, plan)
    if "train" in stages:
        check_student_plan(p.spec, plan.targets, _train_rows(plan, work.reuse, work.stream))
    return work


def student_sources(p: Prepared, stages: tuple[str, ...], precomputing: bool) -> Sources:
    """What the train/eval stages read, opened (and checked) before any run: the committed cache
    when no precompute comes first, the packed corpus when some student trains online."""
    from kdscale.data.corpus import pack_corpus

    sources = Sources()
    if "train" not in stages and "eval" not in stages:
        return sources
    spec = p.spec
    if uses_cache(spec) and not precomputing:
        sources.manifest = open_cache_for_students(p, "train" in stages and spec.cache.verify_before_training)
        sources.tasks(p)  # students with their own tokenizer: refused now, before any run or work
    if not all(s.targets == "cache" for s in spec.students):
        sources.corpus = pack_corpus(spec.corpus, p.tokenizer)  # the cache's rows, packed here
    return sources


def start_job(p: Prepared, tracker: Tracker, command: str, tracking: bool) -> str | None:
    """The job's parent MLflow run (None without tracking), recorded in ``summary.json``."""
    parent = tracker.start_job(command)
    mlflow = {
        "tracking_uri": redact_text(tracker.uri) if tracker.uri else None,
        "experiment": p.spec.experiment_name() if tracking else None,
        "parent_run_id": parent,
    }
    write_summary(p.workdir, {"job": p.spec.name, "workdir": p.workdir, "mlflow": mlflow})
    return parent


def run_stages(
    p: Prepared, tracker: Tracker, stages: tuple[str, ...], work: PrecomputeWork | None, sources: Sources
) -> None:
    if work is not None:
        sources.manifest = stage_precompute(p, tracker, work.plan, work.reuse, work.stream)
    elif sources.manifest is not None:
        write_summary(p.workdir, {"cache": cache_summary(p.cache_uri, sources.manifest)})
    elif "precompute" in stages:
        say("No student trains from the cache (all are online): skipping precompute.")
    if "train" in stages:
        stage_train(p, tracker, sources)
    elif "eval" in stages:
        stage_eval(p, tracker, sources)
