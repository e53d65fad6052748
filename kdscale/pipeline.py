"""A job end to end: prepare (validate everything, write nothing) -> precompute -> train -> eval ->
export, with MLflow runs and ``summary.json`` in the workdir.

Stages can run alone (``kdscale precompute|train|eval``); each reads what the previous one left
(the committed cache, the exported students) and merges its part into ``summary.json``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from kdscale import fs
from kdscale.cache.format import Manifest
from kdscale.cache.reader import read_split
from kdscale.config import ConfigError, JobSpec
from kdscale.fingerprint import tokenizer_fingerprint
from kdscale.models.student import build_student, count_parameters, describe, write_teacher_layer_inits
from kdscale.models.task import table_arrays
from kdscale.precompute.score import teacher_heldout
from kdscale.prepare import (
    Prepared,
    check_cache_slot,
    check_cluster,
    check_exports,
    check_workdir,
    describe_plan,
    open_cache_for_students,
    prepare,
    student_plan_problems,
    uses_cache,
)
from kdscale.progress import say
from kdscale.stages import STAGES
from kdscale.summary import cache_summary, log_report, read_summary, write_report, write_summary
from kdscale.tracking.lineage import (
    CACHE_ID_TAG,
    CONTENT_HASH_TAG,
    STUDENT_TAG,
    TEACHER_TAG,
    TOKENIZER_TAG,
    NullTracker,
    Tracker,
    check_reachable,
    tracking_uri,
)
from kdscale.tracking.redact import redact_text


def dry_run(spec: JobSpec, stages: tuple[str, ...], workdir: str | None = None) -> dict[str, Any]:
    """Every check a real run makes before work that needs no teacher pass (the spec, files,
    resources, and for train/eval the committed cache), and the plan; writes nothing."""
    p = prepare(spec, workdir)
    check_workdir(p)
    check_cluster(spec, stages)
    plan = describe_plan(p)
    plan["stages"] = list(stages)
    if "precompute" not in stages and uses_cache(spec):
        m = open_cache_for_students(p, verify_checksums=False)
        problems = student_plan_problems(spec, m.targets, m.dataset.rows["train"]) if "train" in stages else []
        if problems:
            raise ConfigError(spec.name, problems)
        Sources(manifest=m).tasks(p)  # students with their own tokenizer: alignment data and fraction
        plan["cache"] = cache_summary(p.cache_uri, m)
    return plan


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


def metric_names(metrics: dict[str, float]) -> dict[str, float]:
    """MLflow names of evaluation metrics: ``validation/…`` for the validation split's, ``heldout/…`` else."""
    return {(f"validation/{k}" if "validation" in k else f"heldout/{k}"): v for k, v in metrics.items()}


def _evaluate(p: Prepared, model, heldout, task=None):
    from kdscale.student.evaluate import evaluate

    return evaluate(model, heldout, p.spec.eval.batch_size, task or p.task, p.vocabulary_bytes())


# Rows of the train split a student with its own tokenizer is aligned on before training (the
# aligned fraction it must reach, loss.min_aligned_fraction)
ALIGNMENT_SAMPLE_ROWS = 32


def student_task(p: Prepared, index: int, m: Manifest | None):
    """The task a student trains and is evaluated as: the job's, or for a student with its own
    tokenizer the cross-tokenizer one over this cache — refused (naming the field) when the cache
    holds no token bytes or too few of the student's positions align with the teacher's."""
    from kdscale.cache.format import CacheFormatError
    from kdscale.models.cross_task import CrossTokenizerLM, aligned_fraction_of

    s = p.spec.students[index]
    if not s.tokenizer or m is None:
        return p.task
    task = CrossTokenizerLM(s.tokenizer, p.cache_uri, s.seq_len or 2 * m.dataset.seq_len)
    where = f"students.{index}.tokenizer"
    try:
        task.teacher_bytes  # noqa: B018  # loads and checks the cache's token bytes
    except CacheFormatError as e:
        raise ConfigError(p.spec.name, [(where, str(e))]) from None
    sample = table_arrays(read_split(p.cache_uri, m, "train", ALIGNMENT_SAMPLE_ROWS), ("input_ids",))["input_ids"]
    aligned, cut = aligned_fraction_of(task, sample)
    if aligned < s.loss.min_aligned_fraction:
        raise ConfigError(
            p.spec.name,
            [
                (
                    where,
                    f"only {aligned:.1%} of the student's positions share a text boundary with the teacher's (on "
                    f"{len(sample)} training rows; loss.min_aligned_fraction is {s.loss.min_aligned_fraction})",
                )
            ],
        )
    say(
        f"Student {s.name}: own tokenizer, {aligned:.1%} of its positions aligned with the teacher's"
        + (f"; {cut:.0%} of rows cut at {task.student_len} tokens (students.{index}.seq_len)" if cut else "")
    )
    return task


@dataclass
class Sources:
    """The data students train and are evaluated on: the committed cache (``manifest``) for
    cache students, the packed corpus with a teacher pass over its scored rows for online ones."""

    manifest: Manifest | None = None
    corpus: Any = None  # PackedCorpus, only when some student trains online
    _scored: dict[tuple[str, bool], Any] = field(default_factory=dict)
    _tasks: dict[str, Any] = field(default_factory=dict)

    def tasks(self, p: Prepared) -> dict[str, Any]:
        """Each student's task (:func:`student_task`), made (and checked) once."""
        if not self._tasks:
            self._tasks = {s.name: student_task(p, i, self.manifest) for i, s in enumerate(p.spec.students)}
        return self._tasks

    def scored(self, p: Prepared, online: bool, split: str = "heldout"):
        """The rows of a scored split (``heldout``, or ``validation``) with the teacher's NLL and argmax."""
        key = (split, online)
        if key not in self._scored:
            rows = p.spec.eval.max_heldout_rows
            corpus_rows = self.corpus.splits[split] if online else None
            self._scored[key] = (
                teacher_heldout(p, corpus_rows[:rows] if rows else corpus_rows)
                if online
                else read_split(p.cache_uri, self.manifest, split, rows)
            )
        return self._scored[key]

    def has_validation(self, online: bool) -> bool:
        return bool(self.corpus.validation) if online else bool(self.manifest.shards_of("validation"))

    def evaluate(self, p: Prepared, model, online: bool, task=None) -> tuple[dict[str, float], dict[str, list]]:
        """Held-out metrics, and beside them ``validation_*`` (CE, bits per byte, accuracy, top-1
        agreement, the teacher's CE and accuracy) when the data has a validation split (the one to
        choose settings on); and each held-out row's CE (for paired comparisons between students)."""
        heldout = _evaluate(p, model, self.scored(p, online), task)
        metrics = heldout.as_dict()
        if self.has_validation(online):
            v = _evaluate(p, model, self.scored(p, online, "validation"), task)
            metrics.update(
                validation_ce=v.heldout_ce,
                teacher_validation_ce=v.teacher_heldout_ce,
                validation_top1_agreement=v.top1_agreement,
                validation_accuracy=v.accuracy,
                teacher_validation_accuracy=v.teacher_accuracy,
            )
            if v.bits_per_byte is not None:
                metrics["validation_bits_per_byte"] = v.bits_per_byte
        return metrics, {"heldout_row_ce": heldout.row_ce, "heldout_row_bits_per_byte": heldout.row_bits_per_byte}

    def training_data(self, p: Prepared, online: bool, task=None):
        """``task``: a student with its own tokenizer trains on rows of its ``student_len``."""
        import dataclasses

        from kdscale.student.trainer import cache_data, online_data

        if online:
            return online_data(p.spec, self.corpus.train, len(p.tokenizer), self.corpus.content_hash())
        data = cache_data(p.cache_uri, self.manifest)
        student_len = getattr(task, "student_len", None)
        return dataclasses.replace(data, seq_len=student_len) if student_len else data


def _train_rows(plan, reuse: Manifest | None, stream) -> int | None:
    """Training rows, where known before the teacher runs (None: a corpus past the sample)."""
    if reuse is not None:
        return reuse.dataset.rows["train"]
    if stream is not None:
        return stream.sample_rows()["train"] if stream.complete else None
    return plan.dataset.rows["train"]


def stage_train(p: Prepared, tracker: Tracker, sources: Sources) -> dict[str, Any]:
    from kdscale.ray_runtime import ensure_ray
    from kdscale.student.evaluate import export, load_exported
    from kdscale.student.trainer import hf_folder, steps_per_epoch, train_student

    spec = p.spec
    ensure_ray(spec.ray)
    m = sources.manifest
    problems = student_plan_problems(spec, m.targets, m.dataset.rows["train"]) if m is not None else []
    problems += [
        (f"students.{i}.train", f"{len(sources.corpus.train)} training rows are too few for its batch")
        for i, s in enumerate(spec.students)
        if s.targets == "online" and steps_per_epoch(len(sources.corpus.train), s.train) < 1
    ]
    if problems:
        raise ConfigError(spec.name, problems)
    m = sources.manifest
    tasks = sources.tasks(p)  # every refusal before any student trains
    write_teacher_layer_inits(spec, len(p.tokenizer), p.teacher_config, p.student_configs, p.init_uri)
    results = {}
    for s in spec.students:
        online, task = s.targets == "online", tasks[s.name]
        heldout = sources.scored(p, online)
        cfg = p.student_configs[s.name]
        run_id = tracker.start_child(
            f"student-{s.name}", "student", {"kdscale.targets": s.targets, STUDENT_TAG: s.name}
        )
        final = tempfile.mkdtemp(prefix=f"kdscale-final-{s.name}-")  # the trained model, until exported
        try:
            if not online:
                tracker.log_cache(run_id, m, p.cache_uri, context="training")
            tracker.log_params(
                run_id,
                {
                    "student": s.name,
                    "init": s.init,
                    "targets": s.targets,
                    "parameters": count_parameters(cfg, task),
                    "tokenizer": s.tokenizer or "teacher's",
                    **{f"arch.{k}": v for k, v in describe(cfg).items()},
                    **{f"loss.{k}": v for k, v in s.loss.model_dump().items()},
                    **{f"train.{k}": v for k, v in s.train.model_dump().items()},
                    "teacher": spec.teacher.name,
                    **(
                        {}
                        if online
                        else {
                            "teacher_fingerprint": m.teacher.fingerprint,
                            "tokenizer_fingerprint": m.tokenizer.fingerprint,
                            "cache_uri": p.cache_uri,
                        }
                    ),
                },
            )
            seed = s.train.seed if s.train.seed is not None else spec.seed
            untrained = _evaluate(p, build_student(cfg, seed, p.init_uri(s), task), heldout, task).as_dict()
            result = train_student(
                spec,
                s,
                cfg,
                sources.training_data(p, online, task),
                p.student_dir(s.name),
                tracker.uri,
                run_id,
                p.init_uri(s),
                table_arrays(heldout, task.input_columns),
                task.describe(),
                final_dir=final,
            )
            metrics, per_row = sources.evaluate(p, load_exported(hf_folder(result), task), online, task)
            check_finite(s.name, metrics)
            export_uri = export(hf_folder(result), p.tokenizer_for(s.name), p.export_uri(s.name))
            tracker.log_metrics(
                run_id,
                {
                    **metric_names(metrics),
                    "heldout/ce_untrained": untrained["heldout_ce"],
                    "train/seconds": result.seconds,
                    "train/tokens_per_second": _tokens_per_second(result.epochs),
                },
                step=result.steps,
            )
            log_student_plots(tracker, run_id, s.name, result, metrics, untrained["heldout_ce"])
            tags = lineage_tags(p, sources, online)
            if s.tokenizer:  # the cache's tokenizer is the teacher's; the model reads its own
                tags["kdscale.student_tokenizer"] = tokenizer_fingerprint(p.tokenizer_for(s.name))
            registered = tracker.register(run_id, export_uri, s.name, tags)
            tracker.end(run_id)
        except BaseException:
            tracker.end(run_id, "FAILED")
            raise
        finally:
            shutil.rmtree(final, ignore_errors=True)
        history = result.history
        results[s.name] = {
            **metrics,
            "heldout_ce_untrained": untrained["heldout_ce"],
            **per_row,
            "targets": s.targets,
            "init": s.init,
            "tokenizer": s.tokenizer,  # None: the teacher's
            "loss": s.loss.model_dump(),
            "train_tokens": sum(e["tokens"] for e in result.epochs),
            "export": export_uri,
            "steps": result.steps,
            "train_seconds": result.seconds,
            "tokens_per_second": _tokens_per_second(result.epochs),
            "epochs": result.epochs,
            "loss_first": history[0]["loss"] if history else None,
            "loss_last": history[-1]["loss"] if history else None,
            "loss_history": [h["loss"] for h in history],
            "resumed_at_epochs": result.resumed_at_epochs,
            "nodes": result.nodes,
            "evals": result.evals,
            "mlflow_run_id": run_id,
            "cache_id": None if online else m.cache_id,
            "registered_model": None
            if registered is None
            else {"name": registered.name, "version": registered.version},
        }
        if registered is not None:
            say(f"Student {s.name}: registered as MLflow model {registered.name} version {registered.version}")
        validation = f", validation CE {metrics['validation_ce']:.3f}" if "validation_ce" in metrics else ""
        say(
            f"[green]Student {s.name}: held-out CE {metrics['heldout_ce']:.3f}{validation} (untrained "
            f"{untrained['heldout_ce']:.3f}, teacher {metrics['teacher_heldout_ce']:.3f}) -> {export_uri}"
        )
    write_summary(p.workdir, {"students": results})
    return results


def check_finite(student: str, metrics: dict[str, float]) -> None:
    """A student whose held-out CE is not finite is never exported or registered."""
    import math

    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v) and "teacher" not in k}
    if bad:
        raise NonFiniteStudent(f"student {student}: non-finite evaluation {bad}; not exported or registered")


class NonFiniteStudent(RuntimeError):
    pass


def log_student_plots(tracker: Tracker, run_id: str, name: str, result, metrics: dict, untrained: float) -> None:
    from kdscale.tracking import plots

    if result.history:
        figure = plots.loss_curves(result.history, f"student {name}", result.evals)
        tracker.log_figure(run_id, figure, "plots/loss_curves.png")
    tracker.log_figure(run_id, plots.eval_bars(metrics, untrained, f"student {name}"), "plots/eval.png")


def lineage_tags(p: Prepared, sources: Sources, online: bool) -> dict[str, str]:
    """What a registered student version is tagged with: where its targets came from."""
    if online:
        from kdscale.teachers import teacher_identity

        teacher = teacher_identity(p.spec.teacher, len(p.tokenizer), p.spec.seed)
        return {
            TEACHER_TAG: teacher.fingerprint,
            TOKENIZER_TAG: tokenizer_fingerprint(p.tokenizer),
            CONTENT_HASH_TAG: sources.corpus.content_hash(),
            "kdscale.targets": "online",
        }
    m = sources.manifest
    return {
        CACHE_ID_TAG: m.cache_id,
        TEACHER_TAG: m.teacher.fingerprint,
        TOKENIZER_TAG: m.tokenizer.fingerprint,
        CONTENT_HASH_TAG: m.dataset.content_hash,
        "kdscale.targets": "cache",
        "kdscale.cache_uri": p.cache_uri,
    }


def _tokens_per_second(epochs: list[dict[str, Any]]) -> float | None:
    seconds = sum(e["seconds"] for e in epochs)
    return sum(e["tokens"] for e in epochs) / seconds if seconds else None


def stage_eval(p: Prepared, tracker: Tracker, sources: Sources) -> dict[str, Any]:
    """Re-evaluate exported students on the held-out split (e.g. after copying them elsewhere)."""
    from kdscale.student.evaluate import exported, load_exported

    results = {}
    tasks = sources.tasks(p)
    for s in p.spec.students:
        uri = p.export_uri(s.name)
        if not exported(uri):
            raise FileNotFoundError(f"student {s.name} has no export at {uri}; run `kdscale train` first")
        online = s.targets == "online"
        run_id = tracker.start_child(f"eval-{s.name}", "eval", {"kdscale.student": s.name})
        metrics, per_row = sources.evaluate(p, load_exported(uri, tasks[s.name]), online, tasks[s.name])
        if not online:
            tracker.log_cache(run_id, sources.manifest, p.cache_uri, context="evaluation")
        tracker.log_metrics(run_id, metric_names(metrics))
        tracker.end(run_id)
        results[s.name] = {**metrics, **per_row, "export": uri, "eval_run_id": run_id}
        say(f"Student {s.name}: held-out CE {metrics['heldout_ce']:.3f}, teacher {metrics['teacher_heldout_ce']:.3f}")
    write_summary(p.workdir, {"students": results})
    return results


def run(
    spec: JobSpec, stages: tuple[str, ...] = STAGES, workdir: str | None = None, tracking: bool = True
) -> dict[str, Any]:
    """Run the given stages in order; returns the merged summary.

    Everything that can refuse the job (the spec, the teacher's files, a corpus that yields no
    sequences, an unusable cache) is checked before the workdir or any MLflow run is created.
    The cache is only computed and read when some student trains from it; online students read
    the packed corpus and run the teacher themselves."""
    from kdscale.data.corpus import pack_corpus

    p = prepare(spec, workdir)
    check_workdir(p)
    if "eval" in stages and "train" not in stages:
        check_exports(p)
    if tracking:
        check_reachable(tracking_uri(spec))
    started = time.perf_counter()
    students_need = "train" in stages or "eval" in stages
    from_cache = uses_cache(spec)
    check_cluster(spec, stages)
    plan = plan_precompute(p) if "precompute" in stages and from_cache else None
    sources = Sources()
    reuse = stream = None
    if plan is not None:
        reuse = check_cache_slot(p, plan.cache_id)
        if reuse is None and plan.streamed:
            stream = start_stream(p, plan)
        rows = _train_rows(plan, reuse, stream)
        if "train" in stages and rows is not None:
            problems = student_plan_problems(spec, plan.targets, rows)
            if problems:
                raise ConfigError(spec.name, problems)
    if students_need and from_cache and plan is None:
        sources.manifest = open_cache_for_students(p, "train" in stages and spec.cache.verify_before_training)
        sources.tasks(p)  # students with their own tokenizer: refused now, before any run or work
    if students_need and not all(s.targets == "cache" for s in spec.students):
        sources.corpus = pack_corpus(spec.corpus, p.tokenizer)  # the cache's rows, packed here
    fs.makedirs(p.workdir)
    tracker = Tracker(spec) if tracking else NullTracker(spec)
    command = "run" if stages == STAGES else "+".join(stages)
    parent = tracker.start_job(command)
    write_summary(
        p.workdir,
        {
            "job": spec.name,
            "workdir": p.workdir,
            "mlflow": {
                "tracking_uri": redact_text(tracker.uri) if tracker.uri else None,
                "experiment": spec.experiment_name() if tracking else None,
                "parent_run_id": parent,
            },
        },
    )
    try:
        if plan is not None:
            sources.manifest = stage_precompute(p, tracker, plan, reuse, stream)
        elif sources.manifest is not None:
            write_summary(p.workdir, {"cache": cache_summary(p.cache_uri, sources.manifest)})
        elif "precompute" in stages:
            say("No student trains from the cache (all are online): skipping precompute.")
        if "train" in stages:
            stage_train(p, tracker, sources)
        elif "eval" in stages:
            stage_eval(p, tracker, sources)
        if students_need:
            write_report(read_summary(p.workdir))
            if parent is not None:
                log_report(p.workdir, tracker.uri, parent)
        tracker.end(parent)
    except BaseException:
        tracker.end(parent, "FAILED")
        raise
    return write_summary(p.workdir, {"seconds": {command: time.perf_counter() - started}})
