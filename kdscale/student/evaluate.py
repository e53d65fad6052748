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
    top1_agreement: float  # student argmax == teacher argmax, over every position
    accuracy: float  # student argmax == label, over labelled positions (next token; image class)
    teacher_accuracy: float
    teacher_heldout_ce: float
    rows: int
    tokens: int
    # each row's mean CE: what a paired comparison of two students on the same rows needs
    row_ce: list[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, float]:
        """The scalar metrics (``row_ce`` is kept apart)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "row_ce"}


@torch.inference_mode()
def evaluate(model: torch.nn.Module, heldout: pa.Table, batch_size: int = 4, task: Task = CausalLM()) -> HeldoutMetrics:
    model.eval()
    nll_total, labelled, agree, positions, correct, teacher_correct = 0.0, 0, 0, 0, 0, 0
    row_ce: list[float] = []
    for start in range(0, heldout.num_rows, batch_size):
        batch = heldout.slice(start, batch_size)
        arrays = table_arrays(batch, task.input_columns)
        logits = task.logits(model, task.model_inputs(arrays)).float()
        labels = task.labels(arrays)
        nll, count = row_nll(logits, labels)
        nll_total, labelled = nll_total + float(nll.sum()), labelled + int(count.sum())
        row_ce += (nll / count.clamp(min=1)).tolist()
        predicted = logits.argmax(-1)
        teacher_top1 = torch.from_numpy(table_arrays(batch, ("teacher_top1",))["teacher_top1"].astype(np.int64))
        agree += int((predicted == teacher_top1).sum())
        positions += teacher_top1.numel()
        has_label = labels != IGNORE
        correct += int(((predicted == labels) & has_label).sum())
        teacher_correct += int(((teacher_top1 == labels) & has_label).sum())
    teacher_nll = float(np.sum(heldout.column("teacher_nll").to_numpy()))
    ce = nll_total / labelled
    return HeldoutMetrics(
        heldout_ce=ce,
        perplexity=math.exp(ce),
        top1_agreement=agree / positions,
        accuracy=correct / labelled,
        teacher_accuracy=teacher_correct / labelled,
        teacher_heldout_ce=teacher_nll / labelled,
        rows=heldout.num_rows,
        tokens=positions,
        row_ce=row_ce,
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
