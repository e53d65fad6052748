"""Held-out evaluation and Hugging Face export of a trained student (single process, no Ray).

Metrics on the cache's held-out split: cross-entropy (next token; image class) and perplexity,
accuracy against the labels, and top-1 agreement with the teacher (the heldout shards store the
teacher's argmax per position). The teacher's own held-out CE and accuracy come from the cache
(summed NLL per row, argmax), so no teacher is loaded.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa
import torch

from kdscale import fs
from kdscale.models.task import IGNORE, CausalLM, Task, table_arrays
from kdscale.student.losses import row_nll


@dataclass
class HeldoutMetrics:
    heldout_ce: float
    perplexity: float
    top1_agreement: float  # student argmax == teacher argmax, over every position (own tokenizer: see _Tally)
    accuracy: float  # student argmax == label, over labelled positions (next token; image class)
    teacher_accuracy: float
    teacher_heldout_ce: float
    rows: int
    tokens: int
    # held-out NLL in bits per byte of text: comparable across tokenizers, which per-token CE is not
    bits_per_byte: float | None = None
    teacher_bits_per_byte: float | None = None
    aligned_fraction: float | None = None  # own tokenizer: student positions with a teacher boundary
    # each row's mean CE (and bits per byte): what a paired comparison of two students on the same
    # rows needs (bits per byte when their tokenizers differ)
    row_ce: list[float] = field(default_factory=list, repr=False)
    row_bits_per_byte: list[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, float]:
        """The scalar metrics that apply (the per-row lists are kept apart)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("row_")}
        return {k: v for k, v in values.items() if v is not None}


@dataclass
class _Tally:
    """Sums over the held-out batches."""

    nll: float = 0.0
    labelled: int = 0
    agree: int = 0
    compared: int = 0
    correct: int = 0
    teacher_correct: int = 0
    teacher_labelled: int = 0
    label_bytes: int = 0
    teacher_label_bytes: int = 0
    aligned: int = 0
    positions: int = 0
    row_ce: list[float] = field(default_factory=list)
    row_bits_per_byte: list[float] = field(default_factory=list)


def _score(tally: _Tally, model, task: Task, batch: pa.Table, pieces) -> None:
    arrays = task.expand(table_arrays(batch, task.input_columns))
    logits = task.logits(model, task.model_inputs(arrays)).float()
    labels = task.labels(arrays)
    nll, count = row_nll(logits, labels)
    tally.nll, tally.labelled = tally.nll + float(nll.sum()), tally.labelled + int(count.sum())
    tally.row_ce += (nll / count.clamp(min=1)).tolist()
    predicted = logits.argmax(-1)
    stored_top1 = table_arrays(batch, ("teacher_top1",))["teacher_top1"]
    # own tokenizer: compared where the teacher's argmax is a student token at an aligned position
    teacher_top1 = task.teacher_argmax(arrays, stored_top1)
    tally.agree += int((predicted == teacher_top1).sum())
    tally.compared += int((teacher_top1 >= 0).sum())
    has_label = labels != IGNORE
    tally.correct += int(((predicted == labels) & has_label).sum())
    teacher_labels = task.teacher_labels(arrays)
    stored = torch.from_numpy(stored_top1.astype(np.int64))
    tally.teacher_correct += int(((stored == teacher_labels) & (teacher_labels != IGNORE)).sum())
    tally.teacher_labelled += int((teacher_labels != IGNORE).sum())
    own = task.label_bytes(arrays, pieces)
    teacher_own = CausalLM().label_bytes(arrays, pieces) if "input_ids" in arrays else None
    if own is not None and teacher_own is not None:
        tally.label_bytes += int(own.sum())
        tally.teacher_label_bytes += int(teacher_own.sum())
        tally.row_bits_per_byte += (nll / math.log(2) / torch.from_numpy(own).clamp(min=1)).tolist()
    if "teacher_pos" in arrays:
        tally.aligned += int((arrays["teacher_pos"] >= 0).sum())
        tally.positions += int(arrays["student_lengths"].sum())


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module, heldout: pa.Table, batch_size: int = 4, task: Task = CausalLM(), pieces=None
) -> HeldoutMetrics:
    """``pieces``: the teacher vocabulary's bytes (the cache's TokenBytes), for bits per byte;
    None leaves them out."""
    model.eval()
    tally = _Tally()
    for start in range(0, heldout.num_rows, batch_size):
        _score(tally, model, task, heldout.slice(start, batch_size), pieces)
    teacher_nll = float(np.sum(heldout.column("teacher_nll").to_numpy()))
    ce = tally.nll / tally.labelled
    bits = math.log(2)
    return HeldoutMetrics(
        heldout_ce=ce,
        perplexity=math.exp(ce),
        top1_agreement=tally.agree / max(tally.compared, 1),
        accuracy=tally.correct / tally.labelled,
        teacher_accuracy=tally.teacher_correct / max(tally.teacher_labelled, 1),
        teacher_heldout_ce=teacher_nll / max(tally.teacher_labelled, 1),
        rows=heldout.num_rows,
        tokens=tally.compared,
        bits_per_byte=tally.nll / bits / tally.label_bytes if tally.label_bytes else None,
        teacher_bits_per_byte=teacher_nll / bits / tally.teacher_label_bytes if tally.teacher_label_bytes else None,
        aligned_fraction=tally.aligned / tally.positions if tally.positions else None,
        row_ce=tally.row_ce,
        row_bits_per_byte=tally.row_bits_per_byte,
    )


def load_exported(uri: str, task: Task = CausalLM()) -> torch.nn.Module:
    """Load an export (any fsspec URI) with transformers, fetching it locally first if remote."""
    return task.auto_model().from_pretrained(fs.local_copy(uri), dtype=torch.float32)


def export(hf_dir: str, tokenizer, export_uri: str) -> str:
    """Publish the trained student with its tokenizer in Hugging Face format at ``export_uri``."""
    staging = tempfile.mkdtemp(prefix="kdscale-export-")
    try:
        shutil.copytree(hf_dir, staging, dirs_exist_ok=True)
        tokenizer.save_pretrained(staging)
        fs.remove(export_uri)
        fs.put_dir(staging, export_uri)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return export_uri


def exported(export_uri: str) -> bool:
    return fs.exists(fs.join(export_uri, "config.json"))
