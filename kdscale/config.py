"""Typed job specs, loaded from YAML and checked before any work starts.

A job spec is the user's contract with kdscale. We parse it with pydantic (unknown keys are
errors, not silently ignored — a typo like ``zero_stag`` must not quietly fall back to a default)
and then check the outside world it names (corpus files, teacher weights, tokenizer folders).
Every problem from both passes is gathered into one :class:`ConfigError` so the user fixes the
spec in one round trip, and nothing is written anywhere until the spec is clean.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdscale import fs

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
# MLflow experiment names may hold spaces, but never a path separator: a local tracking store turns
# the name into a folder, and ``../../evil`` wrote artifacts outside it.
EXPERIMENT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$"
MAX_SEED = 2**63 - 1  # seeds reach numpy, torch and Ray as signed 64-bit integers


def repeated_names(names: list[Any]) -> str | None:
    dupes = sorted({str(n) for n in names if n is not None and names.count(n) > 1})
    return f"student names must be unique, repeated: {', '.join(dupes)}" if dupes else None


class ConfigError(ValueError):
    """A job spec with one or more problems; ``problems`` holds ``(field, message)`` pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"Invalid job spec {source} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"]
        lines += [f"  - {field}: {message}" for field, message in problems]
        super().__init__("\n".join(lines))


class Strict(BaseModel):
    """Base for every spec section: unknown keys are errors, values are validated on assignment,
    and no float may be inf or nan (``lr: .inf`` trained a NaN student that was then registered)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RaySpec(Strict):
    address: str | None = Field(None, description="Ray cluster address; None starts/joins a local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray started by kdscale.")
    log_to_driver: bool = Field(
        False,
        description="Stream every Ray worker's log lines to the console (they are always kept in Ray's log folder).",
    )


class TrackingSpec(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; MLFLOW_TRACKING_URI wins when set.")
    experiment: str | None = Field(
        None,
        pattern=EXPERIMENT_PATTERN,
        max_length=200,
        description="MLflow experiment name; defaults to the job name.",
    )
    register_models: bool = Field(True, description="Register every exported student in the MLflow Model Registry.")
    model_name: str = Field(
        "{job}-{student}",
        description="Registered model name; {job} and {student} are replaced by the job's and the student's names.",
    )

    @model_validator(mode="after")
    def _known_placeholders(self) -> TrackingSpec:
        unknown = set(re.findall(r"{([^}]*)}", self.model_name)) - {"job", "student"}
        if unknown:
            raise ValueError(f"model_name may only use {{job}} and {{student}}, not {', '.join(sorted(unknown))}")
        return self

    def registered_name(self, job: str, student: str) -> str:
        return self.model_name.replace("{job}", job).replace("{student}", student)


class TeacherSpec(Strict):
    name: str = Field(..., min_length=1)
    backend: str = Field(
        "huggingface",
        description="How the teacher is loaded and run (kdscale.teachers.BACKENDS): huggingface reads a "
        "transformers folder or a GGUF file, or builds a seeded random model (init: random).",
    )
    init: Literal["pretrained", "random"] = "pretrained"
    path: str | None = Field(
        None,
        description="Hugging Face model folder (or the folder holding `gguf_file`). "
        "'pkg:<module>' names an installed Python package's folder, found without importing it.",
    )
    gguf_file: str | None = None
    tokenizer: str | None = Field(
        None,
        description="Tokenizer folder; defaults to the teacher's path (causal_lm; "
        "an image classifier's labels come from its config).",
    )
    architecture: dict[str, Any] | None = Field(
        None, description="For init=random: transformers config fields (model_type defaults to llama)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    replicas: int = Field(1, ge=1, description="Data-parallel copies of the teacher.")
    shards: int = Field(
        1,
        ge=1,
        description="Pipeline stages per replica: the layers split over this many actors (for teachers "
        "that do not fit one device). Actors in all: replicas x shards.",
    )
    batch_size: int = Field(4, ge=1, description="Rows per forward (the micro-batch when sharded).")
    share_weights: bool = Field(
        True,
        description="CPU teachers: load the weights once, into Ray's object store, and let every teacher "
        "actor on a node map that one copy instead of loading its own (one copy per node, and ~7% faster "
        "forwards measured with two replicas). GPU actors always load their own.",
    )
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    start_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="Seconds the teacher actors may take to be placed and load their weights before "
        "the precompute fails naming the resources they asked for (resources no node has are refused before any work).",
    )
    trust_remote_code: bool = False

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        from kdscale.teachers import BACKENDS

        if v not in BACKENDS:
            raise ValueError(f"unknown teacher backend {v!r} (known: {', '.join(BACKENDS)})")
        return v

    @model_validator(mode="after")
    def _init_needs(self) -> TeacherSpec:
        if self.init == "pretrained" and not self.path:
            raise ValueError("init=pretrained needs `path`")
        if self.init == "random" and self.architecture is None:
            raise ValueError("init=random needs `architecture`")
        return self


class CorpusSpec(Strict):
    paths: list[str] = Field(..., min_length=1, description="Files, folders, globs or fsspec URIs (idx: image files).")
    format: Literal["text", "jsonl", "parquet", "idx"] = Field(
        "text",
        description="text: one document per file; jsonl: one per line (`field`); parquet: one per row (`field`); "
        "idx: IDX image files (MNIST's format) with their label files in `labels` (task image_classification).",
    )
    labels: list[str] | None = Field(
        None, description="idx: the label file of each file in `paths`, in the same order."
    )
    heldout_paths: list[str] | None = Field(
        None,
        description="idx: image files of the held-out split (e.g. an official test set); default: a content-hash "
        "split of `paths` by heldout_fraction.",
    )
    heldout_labels: list[str] | None = Field(None, description="idx: the label files of `heldout_paths`.")
    field: str = Field("text", min_length=1, description="The JSON key / Parquet column holding the text.")
    max_files: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Stop after this many tokens (a fixed slice); for images, training images (one position each).",
    )
    seq_len: int = Field(256, ge=8)
    unit_bytes: int = Field(
        32 << 20,
        ge=1024,
        description="Input units: consecutive files grouped, and JSONL files / Parquet row groups cut, at about "
        "this many bytes; each unit is read, tokenized and packed by one Ray task (packing tails of under "
        "seq_len tokens are dropped at unit ends and counted in the manifest).",
    )
    heldout_fraction: float = Field(
        0.05, gt=0, lt=1, description="Rows held out by content hash: the split results are reported on."
    )
    validation_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Rows kept for choosing settings (alpha, "
        "temperature, lr, target kind) by content hash, disjoint from train and "
        "held-out; 0: no validation split.",
    )

    @model_validator(mode="after")
    def _fractions_leave_training_rows(self) -> CorpusSpec:
        if self.heldout_fraction + self.validation_fraction >= 1:
            raise ValueError("heldout_fraction + validation_fraction must leave rows to train on (sum < 1)")
        return self


class TargetsSpec(Strict):
    kind: Literal["sampled", "topk", "full", "stratified"] = Field(
        "sampled",
        description="sampled: N draws (unbiased); topk: k ids + tail mass (biased); stratified: k exact "
        "ids + N draws from the rest (unbiased, lower variance); full: dense (small vocabularies).",
    )
    num_samples: int = Field(
        50, ge=1, le=255, description="sampled: draws per position; stratified: draws from the tail (counts fit uint8)."
    )
    k: int = Field(12, ge=1, description="topk: ids kept per position; stratified: ids kept with exact probabilities.")
    temperature: float = Field(
        1.0,
        gt=0,
        description="Capture temperature of the teacher softmax (students' loss "
        "temperature must equal it, except from a full cache, which is re-tempered exactly).",
    )
    store_logprobs: bool = Field(False, description="sampled: also store the teacher log-prob of each stored id.")
    draws: int = Field(
        1,
        ge=1,
        le=16,
        description="sampled: independent draws stored per position; epoch e "
        "trains on draw e mod draws, so re-used data sees fresh noise instead of one fixed draw.",
    )


class CacheSpec(Strict):
    uri: str | None = Field(None, description="Cache location (any fsspec URI); defaults to <workdir>/cache.")
    targets: TargetsSpec = TargetsSpec()
    rows_per_shard: int = Field(128, ge=1)
    compression_level: int = Field(9, ge=1, le=22, description="zstd level of the shards (9: ~3 us/token to write).")
    verify_before_training: bool = Field(
        True, description="Recompute every shard's sha256 before training starts and refuse a corrupted cache."
    )


class LossSpec(Strict):
    alpha: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Weight of the KD term; 1 - alpha weights hard-label CE. Default 1 (pure KD): on the long "
        "regime's validation split (benchmarks/quality.py, 260 steps, 3 seeds) sampled N=50 at alpha 1 averaged "
        "4.313 validation CE against 4.400 at alpha 0.5 (docs/results.md).",
    )
    temperature: float = Field(1.0, gt=0)
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl"] = "forward_kl"
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="jsd: the teacher's weight in the mixture.")
    skew: float = Field(0.1, gt=0, lt=1, description="skew_kl: the teacher's weight in the student-side mixture.")
    chunk_positions: int = Field(1024, ge=1, description="Positions per chunk of the KD loss (bounds its memory).")
    cross_tokenizer: Literal["uld", "hybrid"] = Field(
        "hybrid",
        description="Students with their own tokenizer: uld compares the sorted probability vectors (Boizard et "
        "al. 2024); hybrid adds a direct KL term on ids whose bytes match across the vocabularies (TRL's GOLD). "
        "Default hybrid: on benchmarks/cross_tokenizer.py (3 seeds) it gave 2.085 held-out bits/byte against "
        "2.493 for uld and 2.481 for the CE-only twin.",
    )
    min_aligned_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Students with their own tokenizer: refuse before training when fewer of the student's "
        "positions than this share a text boundary with a teacher position (those get the hard-label loss only).",
    )


class TrainSpec(Strict):
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    threads_per_worker: int | None = Field(
        None,
        ge=1,
        description="torch threads in each worker; default: its whole CPUs (at least 1). More than its "
        "CPUs may pay where the CPUs Ray reserves for reading the cache are idle between its bursts.",
    )
    use_gpu: bool = False
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    epochs: int = Field(1, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Student init/data-order seed; defaults to the job seed."
    )
    log_every: int = Field(1, ge=1, description="Optimizer steps between loss records/MLflow metrics.")
    eval_every_steps: int = Field(
        0,
        ge=0,
        description="Score the held-out split every this many optimizer steps during training (and at the "
        "last step), giving held-out CE against training tokens; 0: only after training.",
    )
    preload: bool = Field(
        False,
        description="Read and decode the worker's share of the data once and keep it in memory for every "
        "epoch (small caches trained for many epochs); default: stream it each epoch.",
    )
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts from the last checkpoint (-1: unlimited).")
    checkpoint_every_epochs: int = Field(
        1,
        ge=1,
        description="Checkpoint at the end of every this many epochs (and always after the last): a restart "
        "loses at most that many epochs. Each checkpoint costs a DeepSpeed save plus a Hugging Face copy (~1.5 s "
        "for the 6.8M-parameter quickstart student, 10% of its 12-s epochs), so many short epochs want a larger value.",
    )
    prefetch_batches: int = Field(
        4,
        ge=0,
        description="Micro-batches read and decoded ahead of the training step by a background thread, across "
        "epoch boundaries, so a new epoch's stream start-up (1.6-4 s per epoch measured here) overlaps training; "
        "0: read in the training thread.",
    )


class StudentSpec(Strict):
    name: str = Field(..., pattern=NAME_PATTERN)
    init: Literal["config", "pretrained", "teacher_layers"] = "config"
    architecture: dict[str, Any] = Field(
        default_factory=dict,
        description="init=config: config fields overriding the teacher's (same model_type and tokenizer).",
    )
    path: str | None = Field(None, description="init=pretrained: a Hugging Face model folder.")
    teacher_layers: list[int] | None = Field(
        None, description="init=teacher_layers: the teacher layers to copy (default: every other one, as DistilBERT)."
    )
    tokenizer: str | None = Field(
        None,
        description="The student's own tokenizer (a Hugging Face folder or a GGUF file), when it is not the "
        "teacher's: its rows are the cached text re-tokenized, aligned to the teacher by byte boundaries.",
    )
    seq_len: int | None = Field(
        None,
        ge=2,
        description="With `tokenizer`: the student's row length (default twice the corpus seq_len; longer "
        "re-tokenized rows are cut and counted).",
    )
    targets: Literal["cache", "online"] = Field(
        "cache",
        description="cache: read the teacher's targets from the logit cache; online: run the teacher in "
        "every training worker (classic KD; no cache needed).",
    )
    loss: LossSpec = LossSpec()
    train: TrainSpec = TrainSpec()

    @model_validator(mode="after")
    def _init_needs(self) -> StudentSpec:
        if self.init == "pretrained" and not self.path:
            raise ValueError("init=pretrained needs `path`")
        if self.init == "teacher_layers" and self.architecture:
            raise ValueError("init=teacher_layers copies the teacher's architecture; drop `architecture`")
        if self.init != "teacher_layers" and self.teacher_layers is not None:
            raise ValueError("`teacher_layers` needs init=teacher_layers")
        if self.tokenizer and self.init == "teacher_layers":
            raise ValueError("init=teacher_layers copies the teacher's embeddings, which need the teacher's tokenizer")
        if self.tokenizer and self.targets == "online":
            raise ValueError("a student with its own tokenizer trains from the cache (targets: cache)")
        if self.tokenizer and self.loss.divergence != "forward_kl":
            raise ValueError(
                "a student with its own tokenizer uses loss.cross_tokenizer (uld|hybrid), not `divergence`"
            )
        if self.seq_len is not None and not self.tokenizer:
            raise ValueError("`seq_len` is for a student with its own `tokenizer` (others use the cache's rows)")
        return self


class EvalSpec(Strict):
    max_heldout_rows: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)


class JobSpec(Strict):
    name: str = Field(..., pattern=NAME_PATTERN)
    task: Literal["causal_lm", "image_classification"] = Field(
        "causal_lm",
        description="causal_lm: next-token distributions at every position of packed token sequences; "
        "image_classification: one class distribution per image (AutoModelForImageClassification teacher/students).",
    )
    seed: int = Field(0, ge=0, le=MAX_SEED)
    workdir: str | None = Field(None, description="Where outputs go; defaults to runs/<name>.")
    ray: RaySpec = RaySpec()
    tracking: TrackingSpec = TrackingSpec()
    teacher: TeacherSpec
    corpus: CorpusSpec
    cache: CacheSpec = CacheSpec()
    students: list[StudentSpec] = Field(..., min_length=1)
    parallel_students: int | Literal["auto"] = Field(
        "auto",
        description="Students trained at the same time, started in the order listed: auto = as many as the "
        "cluster's CPUs and GPUs hold beside one CPU for reading the cache; N = at most N (1: one after another).",
    )
    eval: EvalSpec = EvalSpec()

    @field_validator("parallel_students", mode="before")
    @classmethod
    def _auto_or_at_least_one(cls, value: Any) -> Any:
        """One message for any bad value (the union alone reports one per member)."""
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError("must be auto or a whole number of students, at least 1")

    @model_validator(mode="after")
    def _unique_student_names(self) -> JobSpec:
        problem = repeated_names([s.name for s in self.students])
        if problem:
            raise ValueError(problem)
        return self

    # Derived locations -------------------------------------------------------------------------
    def resolved_workdir(self, override: str | None = None) -> str:
        return fs.normalize(override or self.workdir or f"runs/{self.name}")

    def resolved_cache_uri(self, workdir: str) -> str:
        return fs.normalize(self.cache.uri) if self.cache.uri else fs.join(workdir, "cache")

    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    def student_seed(self, student: StudentSpec) -> int:
        """A student's effective seed: its own, else the job's."""
        return student.train.seed if student.train.seed is not None else self.seed


# ------------------------------------------------------------------------------------------------
# Loading


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def _pydantic_problems(err: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and e["type"] != "missing" and not isinstance(e["input"], (dict, list)):
                got = repr(e["input"])
                msg += f" (got {got if len(got) <= 80 else got[:77] + '...'})"
        problems.append((_loc(loc), msg))
    return problems


def resolve_package_path(path: str) -> str:
    """Resolve ``pkg:<module>`` to the package's folder without importing it (imports can be slow
    or have side effects; we only want the data files it ships)."""
    import importlib.util

    module = path.removeprefix("pkg:")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Python package {module!r} is not installed")
    return list(spec.submodule_search_locations)[0]


def _relative_to(base: Path, value: str | None) -> str | None:
    """Local relative paths in a spec are relative to the spec file, so jobs run from any cwd."""
    if value is None or value.startswith("pkg:") or fs.is_remote(value) or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def input_path_fields(raw: dict[str, Any]) -> Iterator[tuple[Any, Any, str]]:
    """(container, key, dotted field) of every local input path a raw spec may hold (teacher
    folder and tokenizer, corpus files, student init folders): the one list of them, which
    rebasing relative paths and ``kdscale submit``'s packaging both walk."""
    teacher = raw.get("teacher")
    if isinstance(teacher, dict):
        for key in ("path", "tokenizer"):
            if isinstance(teacher.get(key), str):
                yield teacher, key, f"teacher.{key}"
    corpus = raw.get("corpus")
    for key in ("paths", "labels", "heldout_paths", "heldout_labels"):
        if isinstance(corpus, dict) and isinstance(corpus.get(key), list):
            for i, value in enumerate(corpus[key]):
                if isinstance(value, str):
                    yield corpus[key], i, f"corpus.{key}.{i}"
    for i, student in enumerate(raw.get("students") or []):
        for key in ("path", "tokenizer"):
            if isinstance(student, dict) and isinstance(student.get(key), str):
                yield student, key, f"students.{i}.{key}"


def _rebase_paths(raw: dict[str, Any], base: Path) -> None:
    for container, key, _ in list(input_path_fields(raw)):
        container[key] = _relative_to(base, container[key])


def _str(d: Any, key: str) -> str | None:
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, str) and v else None


def _resource_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Check that the files a spec names exist, without loading anything heavy.

    Works on the raw mapping (tolerating fields that failed validation) so a spec with both a
    typo and a missing file reports both at once."""
    problems: list[tuple[str, str]] = []
    t = raw.get("teacher") if isinstance(raw.get("teacher"), dict) else {}
    path, gguf, tok = _str(t, "path"), _str(t, "gguf_file"), _str(t, "tokenizer")
    if t.get("init", "pretrained") == "pretrained" and path:
        try:
            folder = resolve_package_path(path) if path.startswith("pkg:") else path
        except FileNotFoundError as e:
            problems.append(("teacher.path", str(e)))
        else:
            if not fs.exists(folder):
                problems.append(("teacher.path", f"no such folder: {folder}"))
            elif gguf and not fs.exists(fs.join(folder, gguf)):
                problems.append(("teacher.gguf_file", f"no such file: {fs.join(folder, gguf)}"))
            elif not gguf and not fs.exists(fs.join(folder, "config.json")):
                problems.append(("teacher.path", f"not a Hugging Face model folder (no config.json): {folder}"))
    if tok and not tok.startswith("pkg:") and not fs.exists(tok):
        problems.append(("teacher.tokenizer", f"no such folder: {tok}"))
    corpus = raw.get("corpus") if isinstance(raw.get("corpus"), dict) else {}
    for key in ("paths", "labels", "heldout_paths", "heldout_labels"):
        for i, pattern in enumerate(corpus.get(key) or [] if isinstance(corpus.get(key), list) else []):
            if isinstance(pattern, str) and not fs.expand(pattern):
                problems.append((f"corpus.{key}.{i}", f"no file matches {pattern!r}"))
    students = raw.get("students") if isinstance(raw.get("students"), list) else []
    for i, s in enumerate(students):
        spath = _str(s, "path")
        if (
            isinstance(s, dict)
            and s.get("init") == "pretrained"
            and spath
            and not fs.exists(fs.join(spath, "config.json"))
        ):
            problems.append((f"students.{i}.path", f"not a Hugging Face model folder: {spath}"))
        stok = _str(s, "tokenizer")
        if stok and not fs.exists(stok):
            problems.append((f"students.{i}.tokenizer", f"no such folder or file: {stok}"))
    return problems


def parse_job(raw: Any, source: str = "<spec>", base_dir: Path | None = None, check_resources: bool = True) -> JobSpec:
    """Validate a raw mapping into a :class:`JobSpec`, raising one :class:`ConfigError` listing
    every problem (structure first, then missing files)."""
    if not isinstance(raw, dict):
        raise ConfigError(source, [("<root>", "a job spec must be a YAML mapping")])
    raw = dict(raw)
    _rebase_paths(raw, base_dir or Path.cwd())
    problems: list[tuple[str, str]] = []
    spec = None
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as err:
        problems += _pydantic_problems(err)
        # Model-level checks do not run when a field fails; repeat the cheap ones on the raw input.
        students = raw.get("students")
        if isinstance(students, list) and not any(f == "students" for f, _ in problems):
            dupes = repeated_names([s.get("name") for s in students if isinstance(s, dict)])
            if dupes:
                problems.append(("students", dupes))
    if spec is not None:
        problems += task_problems(spec)
    if check_resources:
        problems += _resource_problems(raw)
    if problems:
        raise ConfigError(source, problems)
    return spec


def task_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """What each task needs of the rest of the spec (a causal LM reads text with a tokenizer; an
    image classifier reads IDX images with label files, and its features are those kdscale
    supports for classifiers)."""
    problems = []
    c = spec.corpus
    if spec.task == "causal_lm":
        if c.format == "idx":
            problems.append(("corpus.format", "idx (images) needs task: image_classification"))
        if spec.teacher.init == "random" and not spec.teacher.tokenizer:
            problems.append(("teacher.tokenizer", "a random causal_lm teacher needs a tokenizer folder"))
        return problems
    if c.format != "idx":
        problems.append(("corpus.format", f"image_classification reads IDX image files (format: idx), not {c.format}"))
    if not c.labels or len(c.labels) != len(c.paths):
        problems.append(
            (
                "corpus.labels",
                f"one label file per image file: {len(c.paths)} in paths, {len(c.labels or [])} in labels",
            )
        )
    if bool(c.heldout_paths) != bool(c.heldout_labels) or len(c.heldout_paths or []) != len(c.heldout_labels or []):
        problems.append(("corpus.heldout_labels", "one label file per file in heldout_paths"))
    if spec.teacher.shards > 1:
        problems.append(("teacher.shards", "a sharded (pipelined) teacher is supported for causal_lm only"))
    for i, s in enumerate(spec.students):
        if s.targets == "online":
            problems.append((f"students.{i}.targets", "online students are supported for causal_lm only; use cache"))
        if s.init == "teacher_layers":
            problems.append((f"students.{i}.init", "teacher_layers is supported for causal_lm only"))
        if s.tokenizer:
            problems.append((f"students.{i}.tokenizer", "a student tokenizer is for causal_lm students only"))
    return problems


def load_job(
    path: str | Path, check_resources: bool = True, overrides: dict[str, Any] | list[str] | None = None
) -> JobSpec:
    """A validated job spec from a YAML file; ``overrides`` set dotted keys first (``{"seed": 1}``, or
    the CLI's ``["students.0.train.lr=3e-4"]``, values parsed as YAML), so one ConfigError lists
    problems of the file and the overrides alike."""
    from kdscale.spec_yaml import SpecYamlError, load_spec_yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), [("<file>", "no such job spec file" if not path.exists() else "not a file")])
    try:
        raw = load_spec_yaml(path.read_bytes())
    except SpecYamlError as e:
        raise ConfigError(str(path), [("<file>", str(e))]) from None
    if overrides:
        problems = apply_overrides(raw, overrides)
        if problems:
            raise ConfigError(str(path), problems)
    return parse_job(raw, str(path), path.parent.resolve(), check_resources)


def apply_overrides(raw: Any, overrides: dict[str, Any] | list[str]) -> list[tuple[str, str]]:
    """Set each dotted key (list items by index) in the raw mapping, in place; returns problems."""
    from kdscale.spec_yaml import SpecYamlError, load_spec_yaml

    problems: list[tuple[str, str]] = []
    pairs: list[tuple[str, Any]] = []
    if isinstance(overrides, dict):
        pairs = list(overrides.items())
    else:
        for item in overrides:
            key, sep, text = item.partition("=")
            if not sep or not key:
                problems.append((item, "an override is KEY=VALUE, e.g. students.0.train.lr=3e-4"))
                continue
            try:
                pairs.append((key.strip(), load_spec_yaml(text.encode())))
            except SpecYamlError as e:
                problems.append((key, f"value is not YAML: {e}"))
    for key, value in pairs:
        node, *parents, leaf = [raw, *key.split(".")]
        try:
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            if isinstance(node, list):
                node[int(leaf)] = value
            elif isinstance(node, dict):
                node[leaf] = value
            else:
                raise TypeError
        except (ValueError, IndexError, TypeError, AttributeError):
            problems.append((key, "no such place in the spec (a list index out of range, or a value, not a mapping)"))
    return problems
