"""What students train and are evaluated on: the committed cache, or for online students the
packed corpus with a teacher pass over its scored rows; and each student's task (the job's, or
the cross-tokenizer one for a student with its own tokenizer). The train, eval and dry-run paths
all read their data through :class:`Sources`, so a split is read (and the teacher run over an
online split) once per job, not once per student."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from kdscale.cache.format import Manifest
from kdscale.cache.reader import read_split
from kdscale.config import ConfigError
from kdscale.models.task import table_arrays
from kdscale.precompute.score import teacher_heldout
from kdscale.prepare import Prepared
from kdscale.progress import say


def evaluate_model(p: Prepared, model, heldout, task=None):
    """``model`` scored on ``heldout`` (scored rows) as ``task`` (default: the job's)."""
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
    # students trained at once read splits from several threads: each is still read (and an online
    # one scored by the teacher) once
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def tasks(self, p: Prepared) -> dict[str, Any]:
        """Each student's task (:func:`student_task`), made (and checked) once."""
        if not self._tasks:
            self._tasks = {s.name: student_task(p, i, self.manifest) for i, s in enumerate(p.spec.students)}
        return self._tasks

    def scored(self, p: Prepared, online: bool, split: str = "heldout"):
        """The rows of a scored split (``heldout``, or ``validation``) with the teacher's NLL and argmax."""
        key = (split, online)
        with self._lock:
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
        heldout = evaluate_model(p, model, self.scored(p, online), task)
        metrics = heldout.as_dict()
        if self.has_validation(online):
            v = evaluate_model(p, model, self.scored(p, online, "validation"), task)
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
