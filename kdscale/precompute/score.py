"""A teacher pass over rows the students are scored on (what a cache's held-out split stores:
each row's summed NLL and the argmax per position), for students trained online without a cache."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdscale.prepare import Prepared


def teacher_heldout(p: Prepared, rows: list) -> Any:
    """Held-out rows with the teacher's summed NLL and argmax, computed here by one teacher pass
    (what the cache's heldout split stores), for students trained online."""
    import numpy as np
    import pyarrow as pa
    import torch

    from kdscale.cache.targets import extract_row
    from kdscale.data.corpus import seq_id
    from kdscale.models.task import next_token_labels
    from kdscale.teachers import load_teacher

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
