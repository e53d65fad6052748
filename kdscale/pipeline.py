"""A job end to end: prepare (validate everything, write nothing) -> precompute -> train -> eval ->
export, with MLflow runs and ``summary.json`` in the workdir.

Stages can run alone (``kdscale precompute|train|eval``); each reads what the previous one left
(the committed cache, the exported students) and merges its part into ``summary.json``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from kdscale import fs
from kdscale.cache.format import CacheFormatError, Manifest
from kdscale.cache.reader import read_split
from kdscale.config import ConfigError, JobSpec
from kdscale.fingerprint import tokenizer_fingerprint
from kdscale.models.student import build_student, count_parameters, describe, student_config
from kdscale.models.task import CausalLM, table_arrays
from kdscale.models.teacher import load_teacher_config, load_tokenizer, shape_problems, weight_problems
from kdscale.precompute.plan import check_teacher_fits, logit_width
from kdscale.progress import say
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

SUMMARY = "summary.json"
REPORT_FILES = ("report.json", "report.md", "report.png")  # in the workdir and the parent run's report/
STAGES = ("precompute", "train", "eval")


@dataclass
class Prepared:
    """Everything a job needs that can be known without doing work."""

    spec: JobSpec
    workdir: str
    cache_uri: str
    tokenizer: Any  # the teacher's tokenizer; for images the image task (labels and input encoding)
    teacher_config: Any
    task: Any  # the task adapter (kdscale.models.task) every stage uses
    student_configs: dict[str, Any] = field(default_factory=dict)

    def student_dir(self, name: str) -> str:
        return fs.join(self.workdir, "students", name)

    def export_uri(self, name: str) -> str:
        return fs.join(self.student_dir(name), "export")

    def init_uri(self, student) -> str | None:
        """Where the student's starting weights are read from (None: a seeded fresh init)."""
        if student.init == "pretrained":
            return student.path
        if student.init == "teacher_layers":
            return fs.join(self.student_dir(student.name), "init")
        return None


def prepare(spec: JobSpec, workdir: str | None = None) -> Prepared:
    """Load the tokenizer and the teacher's config (not its weights), derive every student's
    config, and raise one ConfigError for all problems found. Writes nothing."""
    wd = spec.resolved_workdir(workdir)
    problems = location_problems(spec, wd) + [("teacher.path", b) for b in weight_problems(spec.teacher)]
    problems += [
        (f"students.{i}.path", b)
        for i, s in enumerate(spec.students)
        if s.init == "pretrained"
        for b in student_file_problems(s.path)
    ]
    if problems:
        raise ConfigError(spec.name, problems)
    teacher_config, tokenizer = _teacher(spec)
    vocab = len(tokenizer)
    task = CausalLM() if spec.task == "causal_lm" else tokenizer  # an image task is its own label space
    problems = check_teacher_fits(spec, teacher_config, vocab)
    problems += [
        ("teacher.architecture" if spec.teacher.init == "random" else "teacher.path", pr)
        for pr in shape_problems(teacher_config)
    ]
    configs = {}
    for i, s in enumerate(spec.students):
        try:
            configs[s.name] = student_config(s, teacher_config, vocab, task)
        except ValueError as e:
            problems.append(
                (f"students.{i}.{'teacher_layers' if s.init == 'teacher_layers' else 'architecture'}", str(e))
            )
            continue
        size = task.output_size(configs[s.name])
        if size != vocab:
            problems.append(
                (
                    f"students.{i}",
                    f"vocabulary {size} differs from the teacher tokenizer's {vocab}"
                    if spec.task == "causal_lm"
                    else f"{size} classes differ from the teacher's {vocab}",
                )
            )
    if problems:
        raise ConfigError(spec.name, problems)
    return Prepared(spec, wd, spec.resolved_cache_uri(wd), tokenizer, teacher_config, task, configs)


def _teacher(spec: JobSpec):
    """The teacher's config and tokenizer (an image task for classifiers), or a ConfigError saying
    which field names what could not be read (a bad ``architecture``, an unreadable tokenizer)."""
    if spec.task != "causal_lm":
        return _image_task(spec)
    try:
        tokenizer = load_tokenizer(spec.teacher)
    except (OSError, ValueError) as e:
        field = "teacher.tokenizer" if spec.teacher.tokenizer else "teacher.path"
        raise ConfigError(spec.name, [(field, f"cannot load the tokenizer: {str(e)[:300]}")]) from None
    try:
        return load_teacher_config(spec.teacher, len(tokenizer)), tokenizer
    except (OSError, ValueError) as e:
        field = "teacher.architecture" if spec.teacher.init == "random" else "teacher.path"
        raise ConfigError(spec.name, [(field, str(e)[:400])]) from None


def location_problems(spec: JobSpec, workdir: str) -> list[tuple[str, str]]:
    """A workdir or cache that is a file, or one folder used as both, fails before any work."""
    cache = spec.resolved_cache_uri(workdir)
    problems = [
        (f, f"{uri} is a file, not a folder")
        for f, uri in (("workdir", workdir), ("cache.uri", cache))
        if fs.is_file(uri)
    ]
    if fs.normalize(cache).rstrip("/") == workdir.rstrip("/"):
        problems.append(
            ("cache.uri", f"{cache} is also the workdir; the cache needs its own folder (default <workdir>/cache)")
        )
    return problems


def student_file_problems(path: str | None) -> list[str]:
    """A pretrained student's folder: no custom code, no pickle-only weights (as for teachers)."""
    from kdscale.models.teacher import PICKLE_SUFFIXES, WEIGHT_SUFFIXES, code_problems

    if path is None:
        return []
    problems = code_problems(path, trust_remote_code=False)
    files = [f for f in fs.expand(path) if f.endswith(WEIGHT_SUFFIXES)]
    if files and all(f.endswith(PICKLE_SUFFIXES) for f in files):
        problems.append(
            f"{path} holds only pickle weights; kdscale never unpickles model files: convert them to safetensors"
        )
    return problems


def _image_task(spec: JobSpec):
    """An image job's teacher config and task (labels from the teacher, image size from the
    first IDX file's header), or a ConfigError naming the unreadable file."""
    from kdscale.data.images import IdxError, image_shape
    from kdscale.models.teacher import load_image_task

    teacher_config = load_teacher_config(spec.teacher, None, spec.task)
    if getattr(teacher_config, "num_labels", 0) < 2:
        raise ConfigError(spec.name, [("teacher", "an image classifier teacher needs num_labels >= 2 in its config")])
    files = sorted({f for pattern in spec.corpus.paths for f in fs.expand(pattern)})
    if not files:
        raise ConfigError(spec.name, [("corpus.paths", f"no image file matches {spec.corpus.paths}")])
    try:
        height, width = image_shape(files[0])
    except (IdxError, OSError) as e:
        raise ConfigError(spec.name, [("corpus.paths", str(e))]) from None
    return teacher_config, load_image_task(spec.teacher, teacher_config, height, width)


def dry_run(spec: JobSpec, stages: tuple[str, ...], workdir: str | None = None) -> dict[str, Any]:
    """Every check a real run makes before work that needs no teacher pass (the spec, files,
    resources, and for train/eval the committed cache), and the plan; writes nothing."""
    p = prepare(spec, workdir)
    check_workdir(p)
    check_cluster(spec, stages)
    plan = describe_plan(p)
    plan["stages"] = list(stages)
    if "precompute" not in stages and _uses_cache(spec):
        m = open_cache_for_students(p, verify_checksums=False)
        problems = student_plan_problems(spec, m.targets, m.dataset.rows["train"]) if "train" in stages else []
        if problems:
            raise ConfigError(spec.name, problems)
        plan["cache"] = cache_summary(p.cache_uri, m)
    return plan


def describe_plan(p: Prepared) -> dict[str, Any]:
    """What ``--dry-run`` prints: where things go and what would run."""
    spec = p.spec
    files = sorted({f for pattern in spec.corpus.paths for f in fs.expand(pattern)})
    return {
        "job": spec.name,
        "workdir": p.workdir,
        "cache_uri": p.cache_uri,
        "tracking_uri": redact_text(tracking_uri(spec)),
        "task": p.task.describe(),
        "teacher": {
            "name": spec.teacher.name,
            "replicas": spec.teacher.replicas,
            "dtype": spec.teacher.dtype,
            "vocab_size": len(p.tokenizer),
            "logit_width": logit_width(spec, p.teacher_config),
        },
        "corpus": {
            "files": len(files) if not spec.corpus.max_files else min(len(files), spec.corpus.max_files),
            "seq_len": spec.corpus.seq_len,
            "max_tokens": spec.corpus.max_tokens,
            "heldout_fraction": spec.corpus.heldout_fraction,
            "validation_fraction": spec.corpus.validation_fraction,
        },
        "targets": spec.cache.targets.model_dump(),
        "students": {
            s.name: {
                "architecture": describe(p.student_configs[s.name]),
                "init": s.init,
                "parameters": count_parameters(p.student_configs[s.name], p.task),
                "workers": s.train.num_workers,
                "zero_stage": s.train.zero_stage,
                "epochs": s.train.epochs,
                "loss": s.loss.model_dump(),
            }
            for s in spec.students
        },
    }


# ------------------------------------------------------------------------------------------------


def read_summary(workdir: str) -> dict[str, Any]:
    uri = fs.join(workdir, SUMMARY)
    return fs.read_json(uri) if fs.exists(uri) else {}


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_summary(workdir: str, update: dict[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into summary.json (nested dicts merge, so stages add to each other)."""
    summary = _merge(read_summary(workdir), update)
    fs.write_json(fs.join(workdir, SUMMARY), summary)
    return summary


def write_report(summary: dict[str, Any], baseline: str | None = None) -> dict[str, Any]:
    """Every student beside its baseline (:mod:`kdscale.report`): report.json / .md / .png in the workdir."""
    import io

    import matplotlib.pyplot as plt

    from kdscale.report import build_report, curves, markdown
    from kdscale.tracking import plots

    report = build_report(summary, baseline)
    figure = plots.student_curves(
        curves(summary),
        f"job {report['job']}: held-out CE by student",
        report["baseline"],
        report["teacher_heldout_ce"],
    )
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=110)
    plt.close(figure)
    json_name, md_name, png_name = REPORT_FILES
    fs.write_json(fs.join(summary["workdir"], json_name), report)
    fs.write_bytes(fs.join(summary["workdir"], md_name), markdown(report).encode())
    fs.write_bytes(fs.join(summary["workdir"], png_name), png.getvalue())
    return report


def log_report(workdir: str, tracking: str, run_id: str) -> None:
    """The workdir's report files under ``report/`` of an MLflow run (the job's parent run)."""
    import tempfile
    from pathlib import Path

    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        for name in REPORT_FILES:
            (Path(tmp) / name).write_bytes(fs.read_bytes(fs.join(workdir, name)))
        MlflowClient(tracking).log_artifacts(run_id, tmp, "report")


def cache_summary(cache_uri: str, m: Manifest, reused: bool | None = None) -> dict[str, Any]:
    t = m.totals
    return {
        "uri": cache_uri,
        "cache_id": m.cache_id,
        "target_kind": m.targets.kind,
        "tokens": t["tokens"],
        "rows": t["rows"],
        "bytes": t["bytes"],
        "bytes_per_token": t["bytes_per_token"],
        "target_bytes_per_token": t["target_bytes_per_token"],
        "teacher_heldout_ce": t["teacher_heldout_ce"],
        "teacher_validation_ce": t.get("teacher_validation_ce"),
        "rows_by_split": m.dataset.rows,
        **({} if reused is None else {"reused": reused}),
    }


def check_cluster(spec: JobSpec, stages: tuple[str, ...]) -> None:
    """Refuse, before any work, teacher actors and student workers the Ray cluster cannot hold."""
    from kdscale.ray_runtime import capacity
    from kdscale.resources import student_problems, teacher_problems

    cap = capacity(spec.ray)
    problems = teacher_problems(spec, cap) if "precompute" in stages and _uses_cache(spec) else []
    if "train" in stages:
        problems += [pr for i in range(len(spec.students)) for pr in student_problems(spec, i, cap)]
    if problems:
        raise ConfigError(spec.name, problems)


def _uses_cache(spec: JobSpec) -> bool:
    return any(s.targets == "cache" for s in spec.students)


def check_workdir(p: Prepared) -> None:
    """A workdir whose summary.json belongs to another job is refused before anything in it is touched."""
    owner = read_summary(p.workdir).get("job")
    if owner not in (None, p.spec.name):
        raise ConfigError(
            p.spec.name,
            [("workdir", f"{p.workdir} holds the outputs of job {owner!r}; use another workdir (or --workdir)")],
        )


def student_plan_problems(spec: JobSpec, targets, train_rows: int) -> list[tuple[str, str]]:
    """Cache students against the targets and training rows they will get (from a plan, before
    any teacher work, or from a committed manifest)."""
    from kdscale.student.trainer import cache_problems

    return [
        pr
        for i, s in enumerate(spec.students)
        if s.targets == "cache"
        for pr in cache_problems(spec, i, targets, train_rows)
    ]


def plan_precompute(p: Prepared):
    """Tokenize (in parallel on Ray Data) and pack the corpus, and fingerprint everything into
    the precompute plan. Reads only; raises PlanError/ConfigError for an unusable corpus."""
    from kdscale.data.corpus import pack_corpus
    from kdscale.data.ray_ingest import ray_token_stream
    from kdscale.precompute.plan import build_plan
    from kdscale.ray_runtime import ensure_ray

    ensure_ray(p.spec.ray)
    if p.spec.task != "causal_lm":
        return build_plan(p.spec, p.tokenizer)  # images: read from their IDX files
    corpus = pack_corpus(p.spec.corpus, p.tokenizer, ray_token_stream(p.spec.corpus, p.tokenizer))
    return build_plan(p.spec, p.tokenizer, corpus)


def check_cache_slot(p: Prepared, cache_id: str) -> Manifest | None:
    """Before anything is written: the verified cache to reuse if this job's cache is already
    committed at the URI (every check, checksums too unless ``cache.verify_before_training`` is
    off), None if it is absent or unfinished; refuses another job's cache, finished or not."""
    from kdscale.cache.writer import check_claim
    from kdscale.precompute.runner import existing_cache

    manifest = existing_cache(p.cache_uri, cache_id, p.spec.cache.verify_before_training)
    if manifest is None:
        check_claim(p.cache_uri, cache_id)
    return manifest


def check_exports(p: Prepared) -> None:
    from kdscale.student.evaluate import exported

    missing = [
        (f"students.{i}", f"student {s.name} has no export at {p.export_uri(s.name)}; run `kdscale train` first")
        for i, s in enumerate(p.spec.students)
        if not exported(p.export_uri(s.name))
    ]
    if missing:
        raise ConfigError(p.spec.name, missing)


def stage_precompute(p: Prepared, tracker: Tracker, plan, reuse: Manifest | None = None) -> Manifest:
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
                "dataset_content_hash": plan.dataset.content_hash,
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
        result = run_precompute(spec, plan, p.cache_uri, reuse)
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
    write_summary(
        p.workdir, {"cache": cache_summary(p.cache_uri, m, result.reused), "mlflow": {"precompute_run_id": run_id}}
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


def open_cache_for_students(p: Prepared, verify_checksums: bool) -> Manifest:
    """The committed cache, through the one verification every reader uses (:mod:`kdscale.cache.verify`;
    ``verify_checksums`` adds every file's sha256), for the students' tokenizer, and, unless the
    spec names the cache (``cache.uri``), made by this job's spec."""
    from kdscale.cache.verify import open_cache

    m = open_cache(
        p.cache_uri, checksums=verify_checksums, tokenizer=(tokenizer_fingerprint(p.tokenizer), len(p.tokenizer))
    )
    if not p.spec.cache.uri:
        mismatch = spec_mismatch(p.spec, m)
        if mismatch:
            raise CacheFormatError(
                f"the cache at {p.cache_uri} (cache_id {m.cache_id}) was not made by this job's spec: "
                f"{'; '.join(mismatch)}. Run `kdscale precompute` (or `kdscale run`) for this spec, or name the "
                "cache explicitly with cache.uri to train from it anyway"
            )
    return m


def spec_mismatch(spec: JobSpec, m: Manifest) -> list[str]:
    """Where a manifest differs from what the spec would make, among what is known without a pass
    over the corpus or the teacher's weights: the targets (kind, N, k, temperature, draws, the job
    seed that seeds the draws) and the packing (seq_len, split fractions). File patterns are not
    compared: a project moved to another folder still names the same files (the content hash,
    checked by ``kdscale run``, is the data's identity)."""
    from kdscale.precompute.plan import targets_info

    want, have = targets_info(spec).params(), m.targets.params()
    found = [
        f"targets.{k}: the cache has {have.get(k)!r}, the spec gives {want.get(k)!r}"
        for k in sorted(set(want) | set(have))
        if want.get(k) != have.get(k)
    ]
    d, c = m.dataset, spec.corpus
    for name, cached, wanted in (
        ("corpus.seq_len", d.seq_len, c.seq_len),
        ("corpus.heldout_fraction", d.heldout_fraction, c.heldout_fraction),
        ("corpus.validation_fraction", d.validation_fraction, c.validation_fraction),
    ):
        if cached != wanted and spec.task == "causal_lm":
            found.append(f"{name}: the cache has {cached!r}, the spec gives {wanted!r}")
    return found


def metric_names(metrics: dict[str, float]) -> dict[str, float]:
    """MLflow names of evaluation metrics: ``validation/…`` for the validation split's, ``heldout/…`` else."""
    return {(f"validation/{k}" if "validation" in k else f"heldout/{k}"): v for k, v in metrics.items()}


def _evaluate(p: Prepared, model, heldout):
    from kdscale.student.evaluate import evaluate

    return evaluate(model, heldout, p.spec.eval.batch_size, p.task)


@dataclass
class Sources:
    """The data students train and are evaluated on: the committed cache (``manifest``) for
    cache students, the packed corpus with a teacher pass over its scored rows for online ones."""

    manifest: Manifest | None = None
    corpus: Any = None  # PackedCorpus, only when some student trains online
    _scored: dict[tuple[str, bool], Any] = field(default_factory=dict)

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

    def evaluate(self, p: Prepared, model, online: bool) -> tuple[dict[str, float], list[float]]:
        """Held-out metrics, and beside them ``validation_*`` (CE, accuracy, top-1 agreement, the
        teacher's CE and accuracy) when the data has a validation split (the one to choose settings
        on); and each held-out row's CE (for paired comparisons between students)."""
        heldout = _evaluate(p, model, self.scored(p, online))
        metrics = heldout.as_dict()
        if self.has_validation(online):
            v = _evaluate(p, model, self.scored(p, online, "validation"))
            metrics.update(
                validation_ce=v.heldout_ce,
                teacher_validation_ce=v.teacher_heldout_ce,
                validation_top1_agreement=v.top1_agreement,
                validation_accuracy=v.accuracy,
                teacher_validation_accuracy=v.teacher_accuracy,
            )
        return metrics, heldout.row_ce

    def training_data(self, p: Prepared, online: bool):
        from kdscale.student.trainer import cache_data, online_data

        if online:
            return online_data(p.spec, self.corpus.train, len(p.tokenizer), self.corpus.content_hash())
        return cache_data(p.cache_uri, self.manifest)


def teacher_heldout(p: Prepared, rows: list) -> Any:
    """Held-out rows with the teacher's summed NLL and argmax, computed here by one teacher pass
    (what the cache's heldout split stores), for students trained online."""
    import numpy as np
    import pyarrow as pa
    import torch

    from kdscale.cache.targets import extract_row
    from kdscale.data.corpus import seq_id
    from kdscale.models.task import next_token_labels
    from kdscale.models.teacher import load_teacher

    teacher = load_teacher(p.spec.teacher, len(p.tokenizer), p.spec.seed)
    nll, top1 = [], []
    with torch.inference_mode():
        for row in rows:
            ids = torch.from_numpy(np.asarray(row, dtype=np.int64))
            logits = teacher(input_ids=ids[None]).logits[0, :, : len(p.tokenizer)]
            labels = next_token_labels(ids[None])[0]
            out = extract_row(
                "topk", logits, labels, temperature=1.0, num_samples=0, k=1, seed=0, sid="", with_top1=True
            )
            nll.append(out["teacher_nll"])
            top1.append(out["teacher_top1"])
    return pa.table(
        {
            "seq_id": [seq_id(r) for r in rows],
            "input_ids": pa.array([np.asarray(r, dtype=np.int32) for r in rows], type=pa.list_(pa.int32())),
            "teacher_nll": pa.array(nll, type=pa.float32()),
            "teacher_top1": pa.array(top1, type=pa.list_(pa.int32())),
        }
    )


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
    write_teacher_layer_inits(p)
    m = sources.manifest
    results = {}
    for s in spec.students:
        online = s.targets == "online"
        heldout = sources.scored(p, online)
        cfg = p.student_configs[s.name]
        run_id = tracker.start_child(
            f"student-{s.name}", "student", {"kdscale.targets": s.targets, STUDENT_TAG: s.name}
        )
        try:
            if not online:
                tracker.log_cache(run_id, m, p.cache_uri, context="training")
            tracker.log_params(
                run_id,
                {
                    "student": s.name,
                    "init": s.init,
                    "targets": s.targets,
                    "parameters": count_parameters(cfg, p.task),
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
            untrained = _evaluate(p, build_student(cfg, seed, p.init_uri(s), p.task), heldout).as_dict()
            result = train_student(
                spec,
                s,
                cfg,
                sources.training_data(p, online),
                p.student_dir(s.name),
                tracker.uri,
                run_id,
                p.init_uri(s),
                table_arrays(heldout, p.task.input_columns),
                p.task.describe(),
            )
            metrics, row_ce = sources.evaluate(p, load_exported(hf_folder(result), p.task), online)
            check_finite(s.name, metrics)
            export_uri = export(hf_folder(result), p.tokenizer, p.export_uri(s.name))
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
            registered = tracker.register(run_id, export_uri, s.name, lineage_tags(p, sources, online))
            tracker.end(run_id)
        except BaseException:
            tracker.end(run_id, "FAILED")
            raise
        history = result.history
        results[s.name] = {
            **metrics,
            "heldout_ce_untrained": untrained["heldout_ce"],
            "heldout_row_ce": row_ce,
            "targets": s.targets,
            "init": s.init,
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
        from kdscale.models.teacher import teacher_identity

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


def write_teacher_layer_inits(p: Prepared) -> None:
    """Build and save the starting weights of every init=teacher_layers student (the teacher is
    loaded once, in this process, only when such a student exists)."""
    import tempfile

    from kdscale.models.student import from_teacher_layers, selected_layers
    from kdscale.models.teacher import load_teacher

    wanted = [s for s in p.spec.students if s.init == "teacher_layers"]
    if not wanted:
        return
    teacher = load_teacher(p.spec.teacher, len(p.tokenizer), p.spec.seed)
    for s in wanted:
        layers = selected_layers(s, p.teacher_config)
        student = from_teacher_layers(teacher, p.student_configs[s.name], layers)
        with tempfile.TemporaryDirectory() as tmp:
            student.save_pretrained(tmp, safe_serialization=True)
            fs.remove(p.init_uri(s))
            fs.put_dir(tmp, p.init_uri(s))
        say(f"Student {s.name}: initialised from teacher layers {layers}")


def _tokens_per_second(epochs: list[dict[str, Any]]) -> float | None:
    seconds = sum(e["seconds"] for e in epochs)
    return sum(e["tokens"] for e in epochs) / seconds if seconds else None


def stage_eval(p: Prepared, tracker: Tracker, sources: Sources) -> dict[str, Any]:
    """Re-evaluate exported students on the held-out split (e.g. after copying them elsewhere)."""
    from kdscale.student.evaluate import exported, load_exported

    results = {}
    for s in p.spec.students:
        uri = p.export_uri(s.name)
        if not exported(uri):
            raise FileNotFoundError(f"student {s.name} has no export at {uri}; run `kdscale train` first")
        online = s.targets == "online"
        run_id = tracker.start_child(f"eval-{s.name}", "eval", {"kdscale.student": s.name})
        metrics, row_ce = sources.evaluate(p, load_exported(uri, p.task), online)
        if not online:
            tracker.log_cache(run_id, sources.manifest, p.cache_uri, context="evaluation")
        tracker.log_metrics(run_id, metric_names(metrics))
        tracker.end(run_id)
        results[s.name] = {**metrics, "heldout_row_ce": row_ce, "export": uri, "eval_run_id": run_id}
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
    from kdscale.data.ray_ingest import ray_token_stream
    from kdscale.ray_runtime import ensure_ray

    p = prepare(spec, workdir)
    check_workdir(p)
    if "eval" in stages and "train" not in stages:
        check_exports(p)
    if tracking:
        check_reachable(tracking_uri(spec))
    started = time.perf_counter()
    students_need = "train" in stages or "eval" in stages
    uses_cache = _uses_cache(spec)
    check_cluster(spec, stages)
    plan = plan_precompute(p) if "precompute" in stages and uses_cache else None
    sources = Sources()
    reuse = None
    if plan is not None:
        if "train" in stages:
            problems = student_plan_problems(spec, plan.targets, plan.dataset.rows["train"])
            if problems:
                raise ConfigError(spec.name, problems)
        reuse = check_cache_slot(p, plan.cache_id)
    if students_need and uses_cache and plan is None:
        sources.manifest = open_cache_for_students(p, "train" in stages and spec.cache.verify_before_training)
    if students_need and not all(s.targets == "cache" for s in spec.students):
        ensure_ray(spec.ray)
        sources.corpus = pack_corpus(spec.corpus, p.tokenizer, ray_token_stream(spec.corpus, p.tokenizer))
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
            sources.manifest = stage_precompute(p, tracker, plan, reuse)
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
