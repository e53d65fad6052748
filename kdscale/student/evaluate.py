"""Held-out evaluation and Hugging Face export of a trained student (single process, no Ray).

Metrics on the cache's held-out split: next-token cross-entropy and perplexity, and top-1
agreement with the teacher (the heldout shards store the teacher's argmax per position). The
teacher's own held-out CE comes from the cache (summed NLL per row), so no teacher is loaded.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch

from kdscale import fs
from kdscale.cache.reader import batch_input_ids
from kdscale.student.losses import IGNORE, next_token_labels


@dataclass
class HeldoutMetrics:
    heldout_ce: float
    perplexity: float
    top1_agreement: float
    teacher_heldout_ce: float
    rows: int
    tokens: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, heldout: pa.Table, batch_size: int = 4) -> HeldoutMetrics:
    model.eval()
    nll_sum, labelled, agree, positions = 0.0, 0, 0, 0
    for start in range(0, heldout.num_rows, batch_size):
        batch = heldout.slice(start, batch_size)
        ids = batch_input_ids(batch)
        logits = model(input_ids=ids).logits.float()
        labels = next_token_labels(ids)
        nll_sum += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
            )
        )
        labelled += int((labels != IGNORE).sum())
        teacher_top1 = np.stack([np.asarray(x) for x in batch.column("teacher_top1").to_pylist()])
        agree += int((logits.argmax(-1).numpy() == teacher_top1).sum())
        positions += teacher_top1.size
    teacher_nll = float(np.sum(heldout.column("teacher_nll").to_numpy()))
    ce = nll_sum / labelled
    return HeldoutMetrics(
        heldout_ce=ce,
        perplexity=math.exp(ce),
        top1_agreement=agree / positions,
        teacher_heldout_ce=teacher_nll / labelled,
        rows=heldout.num_rows,
        tokens=heldout.num_rows * ids.shape[1],
    )


def load_exported(uri: str) -> torch.nn.Module:
    """Load an export (any fsspec URI) with transformers, fetching it locally first if remote."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(fs.local_copy(uri), dtype=torch.float32)


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

