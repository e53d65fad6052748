"""The train and eval stages: for each student, one MLflow run that trains it on Ray Train,
evaluates it (held-out and validation), exports it in Hugging Face format and registers it with
its lineage; then the students' part of ``summary.json``. Every refusal (batch too large for the
data, an unusable own tokenizer) is raised before the first student trains, so a bad third
student does not cost the first two's training."""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.progress import Progress

from kdscale.config import ConfigError, JobSpec, StudentSpec
from kdscale.fingerprint import tokenizer_fingerprint
from kdscale.models.student import build_student, count_parameters, describe, write_teacher_layer_inits
from kdscale.models.task import table_arrays
from kdscale.parallel_students import train_students
from kdscale.prepare import Prepared, student_plan_problems
from kdscale.progress import bar, say
from kdscale.resources import parallel_limit, room_for, student_demand, students_at_once
from kdscale.sources import Sources, evaluate_model
from kdscale.summary import utc, write_summary
from kdscale.tracking.lineage import CACHE_ID_TAG, CONTENT_HASH_TAG, STUDENT_TAG, TEACHER_TAG, TOKENIZER_TAG, Tracker


class NonFiniteStudent(RuntimeError):
    """A student whose evaluation is not finite: never exported or registered."""


@dataclass
class Trained:
    """One student's outcome, before it is written into the summary."""

    untrained_ce: float
    result: Any  # kdscale.student.trainer.TrainResult
    metrics: dict[str, float]
    per_row: dict[str, list]
    export_uri: str
    registered: Any  # an MLflow ModelVersion, or None without a registry


def stage_train(p: Prepared, tracker: Tracker, sources: Sources) -> dict[str, Any]:
    """Train, evaluate, export and register every student, as many at once as the cluster holds
    (``parallel_students``), each with a bar in one shared progress display."""
    from kdscale.ray_runtime import ensure_ray

    ensure_ray(p.spec.ray)
    check_batches_fit(p, sources)
    tasks = sources.tasks(p)  # every refusal before any student trains
    write_teacher_layer_inits(p.spec, len(p.tokenizer), p.teacher_config, p.student_configs, p.init_uri)
    may_start = room_checker(p.spec)
    runs: dict[str, str | None] = {}  # each student's MLflow run, once started

    def abandon(s: StudentSpec) -> None:
        if s.name in runs:
            tracker.end(runs[s.name], "FAILED")

    with bar("tok") as progress:
        results = train_students(
            p.spec.students,
            lambda s: train_one(p, tracker, sources, s, tasks[s.name], progress, runs),
            may_start,
            abandon,
        )
    write_summary(p.workdir, {"students": results})
    return results


def room_checker(spec: JobSpec) -> Callable[[list[StudentSpec], StudentSpec], bool]:
    """Whether a student may start beside the running ones: the cluster's room
    (:func:`kdscale.resources.room_for`) within ``parallel_students``; says once how many may
    train at once when the job has more than one student."""
    from kdscale.ray_runtime import capacity

    cap, limit = capacity(spec.ray), parallel_limit(spec)

    def may_start(running: list[StudentSpec], s: StudentSpec) -> bool:
        return room_for([student_demand(r) for r in running], student_demand(s), cap, limit)

    if len(spec.students) > 1:
        say(f"Students train {students_at_once(spec, cap)}")
    return may_start


def check_batches_fit(p: Prepared, sources: Sources) -> None:
    """Each student's batch against its data: the cache's training rows, or the packed corpus's."""
    from kdscale.student.trainer import steps_per_epoch

    spec, m = p.spec, sources.manifest
    problems = student_plan_problems(spec, m.targets, m.dataset.rows["train"]) if m is not None else []
    problems += [
        (f"students.{i}.train", f"{len(sources.corpus.train)} training rows are too few for its batch")
        for i, s in enumerate(spec.students)
        if s.targets == "online" and steps_per_epoch(len(sources.corpus.train), s.train) < 1
    ]
    if problems:
        raise ConfigError(spec.name, problems)


def train_one(
    p: Prepared, tracker: Tracker, sources: Sources, s: StudentSpec, task, progress: Progress, runs: dict
) -> dict[str, Any]:
    """One student's MLflow run (recorded in ``runs``), ended FAILED if anything in it raises;
    its summary entry."""
    run_id = tracker.start_child(f"student-{s.name}", "student", {"kdscale.targets": s.targets, STUDENT_TAG: s.name})
    runs[s.name] = run_id
    final = tempfile.mkdtemp(prefix=f"kdscale-final-{s.name}-")  # the trained model, until exported
    try:
        trained = train_evaluate_export(p, tracker, sources, s, task, run_id, final, progress)
        tracker.end(run_id)
    except BaseException:
        tracker.end(run_id, "FAILED")
        raise
    finally:
        shutil.rmtree(final, ignore_errors=True)
    announce(s, trained)
    return student_summary(sources, s, trained, run_id)


def train_evaluate_export(
    p: Prepared,
    tracker: Tracker,
    sources: Sources,
    s: StudentSpec,
    task,
    run_id: str | None,
    final: str,
    progress: Progress,
) -> Trained:
    from kdscale.student.evaluate import export, load_exported
    from kdscale.student.trainer import hf_folder, train_student

    online, cfg = s.targets == "online", p.student_configs[s.name]
    heldout = sources.scored(p, online)
    if not online:
        tracker.log_cache(run_id, sources.manifest, p.cache_uri, context="training")
    tracker.log_params(run_id, student_params(p, sources, s, task))
    untrained = evaluate_model(p, build_student(cfg, p.spec.student_seed(s), p.init_uri(s), task), heldout, task)
    untrained_ce = untrained.heldout_ce
    result = train_student(
        p.spec,
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
        progress=progress,
    )
    metrics, per_row = sources.evaluate(p, load_exported(hf_folder(result), task), online, task)
    check_finite(s.name, metrics)
    export_uri = export(hf_folder(result), p.tokenizer_for(s.name), p.export_uri(s.name))
    tracker.log_metrics(
        run_id,
        {
            **metric_names(metrics),
            "heldout/ce_untrained": untrained_ce,
            "train/seconds": result.seconds,
            "train/tokens_per_second": tokens_per_second(result.epochs),
        },
        step=result.steps,
    )
    log_student_plots(tracker, run_id, s.name, result, metrics, untrained_ce)
    registered = tracker.register(run_id, export_uri, s.name, registry_tags(p, sources, s))
    return Trained(untrained_ce, result, metrics, per_row, export_uri, registered)


def student_params(p: Prepared, sources: Sources, s: StudentSpec, task) -> dict[str, Any]:
    """What a student's MLflow run records as parameters: its settings and what it learns from."""
    cfg, m = p.student_configs[s.name], sources.manifest
    params = {
        "student": s.name,
        "init": s.init,
        "targets": s.targets,
        "parameters": count_parameters(cfg, task),
        "tokenizer": s.tokenizer or "teacher's",
        **{f"arch.{k}": v for k, v in describe(cfg).items()},
        **{f"loss.{k}": v for k, v in s.loss.model_dump().items()},
        **{f"train.{k}": v for k, v in s.train.model_dump().items()},
        "teacher": p.spec.teacher.name,
    }
    if s.targets != "online":
        params["teacher_fingerprint"] = m.teacher.fingerprint
        params["tokenizer_fingerprint"] = m.tokenizer.fingerprint
        params["cache_uri"] = p.cache_uri
    return params


def student_summary(sources: Sources, s: StudentSpec, t: Trained, run_id: str | None) -> dict[str, Any]:
    """A trained student's entry in ``summary.json``."""
    result, history = t.result, t.result.history
    return {
        **t.metrics,
        "heldout_ce_untrained": t.untrained_ce,
        **t.per_row,
        "targets": s.targets,
        "init": s.init,
        "tokenizer": s.tokenizer,  # None: the teacher's
        "loss": s.loss.model_dump(),
        "train_tokens": sum(e["tokens"] for e in result.epochs),
        "export": t.export_uri,
        "steps": result.steps,
        "train_seconds": result.seconds,
        "training_reused": result.reused,  # a finished checkpoint: no training in this call
        "trained_from": None if result.reused else utc(result.started_at),  # this call's training (UTC)
        "trained_until": None if result.reused else utc(result.ended_at),
        "tokens_per_second": tokens_per_second(result.epochs),
        "epochs": result.epochs,
        "loss_first": history[0]["loss"] if history else None,
        "loss_last": history[-1]["loss"] if history else None,
        "loss_history": [h["loss"] for h in history],
        "resumed_at_epochs": result.resumed_at_epochs,
        "nodes": result.nodes,
        "evals": result.evals,
        "mlflow_run_id": run_id,
        "cache_id": None if s.targets == "online" else sources.manifest.cache_id,
        "registered_model": None
        if t.registered is None
        else {"name": t.registered.name, "version": t.registered.version},
    }


def announce(s: StudentSpec, t: Trained) -> None:
    if t.registered is not None:
        say(f"Student {s.name}: registered as MLflow model {t.registered.name} version {t.registered.version}")
    validation = f", validation CE {t.metrics['validation_ce']:.3f}" if "validation_ce" in t.metrics else ""
    say(
        f"[green]Student {s.name}: held-out CE {t.metrics['heldout_ce']:.3f}{validation} (untrained "
        f"{t.untrained_ce:.3f}, teacher {t.metrics['teacher_heldout_ce']:.3f}) -> {t.export_uri}"
    )


def metric_names(metrics: dict[str, float]) -> dict[str, float]:
    """MLflow names of evaluation metrics: ``validation/…`` for the validation split's, ``heldout/…`` else."""
    return {(f"validation/{k}" if "validation" in k else f"heldout/{k}"): v for k, v in metrics.items()}


def check_finite(student: str, metrics: dict[str, float]) -> None:
    """A student whose held-out CE is not finite is never exported or registered."""
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v) and "teacher" not in k}
    if bad:
        raise NonFiniteStudent(f"student {student}: non-finite evaluation {bad}; not exported or registered")


def log_student_plots(tracker: Tracker, run_id: str | None, name: str, result, metrics: dict, untrained: float) -> None:
    from kdscale.tracking import plots

    if result.history:
        figure = plots.loss_curves(result.history, f"student {name}", result.evals)
        tracker.log_figure(run_id, figure, "plots/loss_curves.png")
    tracker.log_figure(run_id, plots.eval_bars(metrics, untrained, f"student {name}"), "plots/eval.png")


def registry_tags(p: Prepared, sources: Sources, s: StudentSpec) -> dict[str, str]:
    """What a registered student version is tagged with: where its targets came from, and for a
    student with its own tokenizer, that tokenizer (the cache's is the teacher's)."""
    tags = online_lineage(p, sources) if s.targets == "online" else cache_lineage(p, sources)
    if s.tokenizer:
        tags["kdscale.student_tokenizer"] = tokenizer_fingerprint(p.tokenizer_for(s.name))
    return tags


def online_lineage(p: Prepared, sources: Sources) -> dict[str, str]:
    from kdscale.teachers import teacher_identity

    teacher = teacher_identity(p.spec.teacher, len(p.tokenizer), p.spec.seed)
    return {
        TEACHER_TAG: teacher.fingerprint,
        TOKENIZER_TAG: tokenizer_fingerprint(p.tokenizer),
        CONTENT_HASH_TAG: sources.corpus.content_hash(),
        "kdscale.targets": "online",
    }


def cache_lineage(p: Prepared, sources: Sources) -> dict[str, str]:
    m = sources.manifest
    return {
        CACHE_ID_TAG: m.cache_id,
        TEACHER_TAG: m.teacher.fingerprint,
        TOKENIZER_TAG: m.tokenizer.fingerprint,
        CONTENT_HASH_TAG: m.dataset.content_hash,
        "kdscale.targets": "cache",
        "kdscale.cache_uri": p.cache_uri,
    }


def tokens_per_second(epochs: list[dict[str, Any]]) -> float | None:
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
