"""Everything a job needs that can be known, and every check that can refuse it, before any work:
the spec's files, the teacher's config and tokenizer, the students' configs, the cluster's
resources, the workdir and the cache slot. Nothing here writes anything."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kdscale import fs
from kdscale.cache.format import CacheFormatError, Manifest
from kdscale.config import ConfigError, JobSpec
from kdscale.fingerprint import tokenizer_fingerprint
from kdscale.models.arch import shape_problems
from kdscale.models.student import count_parameters, describe, student_config
from kdscale.models.task import CausalLM
from kdscale.precompute.plan import check_teacher_fits, logit_width
from kdscale.resources import Capacity
from kdscale.summary import read_summary
from kdscale.teachers import load_teacher_config, load_tokenizer, teacher_file_problems
from kdscale.tracking.lineage import (
    tracking_uri,
)
from kdscale.tracking.redact import redact_text


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
    student_tokenizers: dict[str, Any] = field(default_factory=dict)  # students with their own tokenizer
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)

    def tokenizer_for(self, name: str):
        """The tokenizer a student reads (and is exported with): its own, else the teacher's."""
        return self.student_tokenizers.get(name, self.tokenizer)

    def vocabulary_bytes(self):
        """The teacher vocabulary's bytes (kdscale.data.alignment.TokenBytes; None for images or
        a tokenizer whose bytes cannot be recovered): bits per byte, and what caches store for
        students with their own tokenizer."""
        if "bytes" not in self._memo:
            from kdscale.data.alignment import exact_token_bytes

            self._memo["bytes"] = exact_token_bytes(self.tokenizer) if self.spec.task == "causal_lm" else None
        return self._memo["bytes"]

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
    problems = location_problems(spec, wd) + [("teacher.path", b) for b in teacher_file_problems(spec.teacher)]
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
    prepared = Prepared(spec, wd, spec.resolved_cache_uri(wd), tokenizer, teacher_config, task)
    own, tokenizer_problems = student_tokenizers(spec, prepared.vocabulary_bytes)
    problems += tokenizer_problems
    configs = {}
    for i, s in enumerate(spec.students):
        if s.tokenizer and s.name not in own:
            continue
        student_vocab = len(own[s.name]) if s.name in own else vocab
        try:
            configs[s.name] = student_config(s, teacher_config, student_vocab, task)
        except ValueError as e:
            problems.append(
                (f"students.{i}.{'teacher_layers' if s.init == 'teacher_layers' else 'architecture'}", str(e))
            )
            continue
        if s.name in own:
            use_own_special_tokens(configs[s.name], own[s.name])
        size = task.output_size(configs[s.name])
        too_small, differs = size < student_vocab, size != vocab
        if too_small if s.name in own else differs:
            problems.append((f"students.{i}", vocabulary_problem(spec, size, student_vocab, s.name in own)))
    if problems:
        raise ConfigError(spec.name, problems)
    prepared.student_configs, prepared.student_tokenizers = configs, own
    return prepared


def vocabulary_problem(spec: JobSpec, size: int, vocab: int, own: bool) -> str:
    if own:
        return f"vocabulary {size} is smaller than its own tokenizer's {vocab}"
    if spec.task == "causal_lm":
        return (
            f"vocabulary {size} differs from the teacher tokenizer's {vocab} (or give the student its own `tokenizer`)"
        )
    return f"{size} classes differ from the teacher's {vocab}"


def student_tokenizers(spec: JobSpec, teacher_bytes: Callable[[], Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The students' own tokenizers, and every reason one cannot serve: unreadable, no offsets
    (a slow tokenizer), no end-of-text token (packed documents are separated by it), a teacher
    tokenizer whose bytes cannot be recovered (nothing can be aligned to its rows), or the hybrid
    loss with a student vocabulary whose bytes cannot be recovered (it matches ids by bytes).
    ``teacher_bytes``: the teacher vocabulary's bytes (or None), computed once per job."""
    from kdscale.data.alignment import exact_token_bytes
    from kdscale.interop.importer import load_tokenizer_at

    found, problems = {}, []
    for i, s in enumerate(spec.students):
        if not s.tokenizer:
            continue
        where = f"students.{i}.tokenizer"
        if teacher_bytes() is None:
            problems.append(
                (
                    where,
                    "the teacher's tokenizer does not give its tokens' exact bytes, so its rows cannot be "
                    "aligned to another tokenizer's",
                )
            )
            continue
        try:
            tok = load_tokenizer_at(s.tokenizer)
        except (OSError, ValueError) as e:
            problems.append((where, f"cannot load the tokenizer: {str(e)[:300]}"))
            continue
        if not getattr(tok, "is_fast", False):
            problems.append(
                (where, f"{s.tokenizer} cannot produce character offsets (a fast tokenizer is needed to align it)")
            )
            continue
        if tok.eos_token_id is None:
            problems.append((where, f"{s.tokenizer} has no end-of-text token to separate packed documents"))
            continue
        if s.loss.cross_tokenizer == "hybrid" and exact_token_bytes(tok) is None:
            problems.append(
                (
                    f"students.{i}.loss.cross_tokenizer",
                    "hybrid matches ids by their bytes, which this tokenizer does not give; use uld",
                )
            )
            continue
        found[s.name] = tok
    return found, problems


def use_own_special_tokens(config, tokenizer) -> None:
    """A student with its own tokenizer starts, ends and pads with that tokenizer's tokens."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None or hasattr(config, name):
            setattr(config, name, value)


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
    from kdscale.models.files import WEIGHT_SUFFIXES, code_problems, pickle_only_problem

    if path is None:
        return []
    weights = [f for f in fs.expand(path) if f.endswith(WEIGHT_SUFFIXES)]
    return code_problems(path, trust_remote_code=False) + pickle_only_problem(path, weights)


def _image_task(spec: JobSpec):
    """An image job's teacher config and task (labels from the teacher, image size from the
    first IDX file's header), or a ConfigError naming the unreadable file."""
    from kdscale.data.images import IdxError, image_shape
    from kdscale.teachers import load_image_task

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


def describe_plan(p: Prepared) -> dict[str, Any]:
    """What ``--dry-run`` prints: where things go and what would run."""
    from kdscale.data.corpus import corpus_files
    from kdscale.data.units import list_units

    spec = p.spec
    files = corpus_files(spec.corpus)
    units = len(list_units(files, spec.corpus.format, spec.corpus.unit_bytes)) if spec.task == "causal_lm" else None
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
            "files": len(files),
            "units": units,  # input units, each packed by one Ray task (from file metadata: nothing read)
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
                "tokenizer": s.tokenizer,  # None: the teacher's
                "vocab_size": len(p.tokenizer_for(s.name)),
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


def check_cluster(spec: JobSpec, stages: tuple[str, ...]) -> Capacity:
    """Refuse, before any work, teacher actors and student workers the Ray cluster cannot hold;
    what the cluster has."""
    from kdscale.ray_runtime import capacity
    from kdscale.resources import student_problems, teacher_problems

    cap = capacity(spec.ray)
    problems = teacher_problems(spec, cap) if "precompute" in stages and uses_cache(spec) else []
    if "train" in stages:
        problems += [pr for i in range(len(spec.students)) for pr in student_problems(spec, i, cap)]
    if problems:
        raise ConfigError(spec.name, problems)
    return cap


def uses_cache(spec: JobSpec) -> bool:
    return any(s.targets == "cache" for s in spec.students)


def check_workdir(p: Prepared) -> None:
    """A workdir whose summary.json belongs to another job is refused before anything in it is touched."""
    owner = read_summary(p.workdir).get("job")
    if owner not in (None, p.spec.name):
        raise ConfigError(
            p.spec.name,
            [("workdir", f"{p.workdir} holds the outputs of job {owner!r}; use another workdir (or --workdir)")],
        )


def student_plan_problems(spec: JobSpec, targets, train_rows: int | None) -> list[tuple[str, str]]:
    """Cache students against the targets and training rows they will get (from a plan, before
    any teacher work, or from a committed manifest; rows None: the targets alone)."""
    from kdscale.student.trainer import cache_problems

    return [
        pr
        for i, s in enumerate(spec.students)
        if s.targets == "cache"
        for pr in cache_problems(spec, i, targets, train_rows)
    ]


def check_student_plan(spec: JobSpec, targets, train_rows: int | None) -> None:
    """Refuse the job (ConfigError, every problem) when a cache student's settings do not fit
    the targets and training rows it will get; ``train_rows`` None (a text corpus not packed yet)
    checks the targets alone: a loss temperature the cache cannot serve is refused before the
    teacher runs, not after it."""
    problems = student_plan_problems(spec, targets, train_rows)
    if problems:
        raise ConfigError(spec.name, problems)


def check_exports(p: Prepared) -> None:
    from kdscale.student.evaluate import exported

    missing = [
        (f"students.{i}", f"student {s.name} has no export at {p.export_uri(s.name)}; run `kdscale train` first")
        for i, s in enumerate(p.spec.students)
        if not exported(p.export_uri(s.name))
    ]
    if missing:
        raise ConfigError(p.spec.name, missing)


def check_cache_slot(p: Prepared, cache_id: str, checksums: bool | None = None) -> Manifest | None:
    """Before anything is written: the verified cache to reuse if this job's cache is already
    committed at the URI (every check, checksums too unless ``checksums`` or, when it is None,
    ``cache.verify_before_training`` says not), None if it is absent or unfinished; refuses
    another job's cache, finished or not."""
    from kdscale.cache.writer import check_claim
    from kdscale.precompute.runner import existing_cache

    if checksums is None:
        checksums = p.spec.cache.verify_before_training
    manifest = existing_cache(p.cache_uri, cache_id, checksums)
    if manifest is None:
        check_claim(p.cache_uri, cache_id)
    return manifest


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
