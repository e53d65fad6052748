"""A causal LM student with its own tokenizer, trained from a cache made with the teacher's.

The cache stores the teacher's token ids per row and, once per cache, the bytes each teacher id
stands for (``token_bytes.parquet``), so every row's text and each teacher token's byte span are
known exactly. The student's row is that text re-tokenized with the student's tokenizer (packed
documents stay apart: the teacher's separators become the student's end-of-text token), and each
student position is aligned to the teacher position whose token ends at the same byte
(:func:`kdscale.data.alignment.align_row`): both then predict the text that starts there, so the
teacher's distribution at that position is a target for the student's. Student positions with no
such teacher boundary (inside a teacher token) get the hard-label loss only.

Rows are aligned where they are read (in the training worker, or the evaluator), from the
stored columns; nothing student-specific is cached, so one cache serves any number of student
tokenizers. No Ray, no DeepSpeed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import torch

from kdscale.data.alignment import AlignedRow, align_row, aligned_fraction, exact_matches, exact_token_bytes
from kdscale.models.task import IGNORE, CausalLM, next_token_labels, to_device
from kdscale.targets import AlignedTargets, DenseTargets, SparseTargets

# A full cache's dense distribution becomes this many ids plus its tail mass for the
# cross-tokenizer losses (which compare sparse vectors).
DENSE_TO_SPARSE_K = 256


@dataclass(frozen=True)
class CrossTokenizerLM(CausalLM):
    """The student reads its own tokens; the teacher targets come from the aligned positions."""

    tokenizer_path: str = ""
    cache_uri: str = ""
    student_len: int = 0

    name: ClassVar[str] = "cross_tokenizer_lm"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tokenizer": self.tokenizer_path,
            "cache_uri": self.cache_uri,
            "student_len": self.student_len,
        }

    # what alignment needs, loaded once where the task is used ----------------------------------

    @cached_property
    def tokenizer(self):
        from kdscale.interop.importer import load_tokenizer_at

        return load_tokenizer_at(self.tokenizer_path)

    @cached_property
    def teacher_bytes(self):
        from kdscale.cache.reader import load_token_bytes, open_manifest

        return load_token_bytes(self.cache_uri, open_manifest(self.cache_uri))

    @cached_property
    def student_bytes(self):
        """The student vocabulary's bytes, or None where they cannot be recovered exactly."""
        return exact_token_bytes(self.tokenizer)

    @cached_property
    def vocab_map(self):
        """Teacher ids whose bytes equal a student id's (the hybrid loss's direct KL term), or None."""
        from kdscale.student.cross_losses import VocabMap

        if self.student_bytes is None:
            return None
        teacher_ids, student_ids = exact_matches(self.teacher_bytes, self.student_bytes)
        return VocabMap.from_pairs(teacher_ids, student_ids, len(self.teacher_bytes), len(self.tokenizer))

    @cached_property
    def _separators(self) -> np.ndarray:
        """Teacher ids that stand for no text (end-of-text and other special tokens): where packed
        documents meet."""
        return self.teacher_bytes.lengths() == 0

    @property
    def separator(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos) if eos is not None else 0

    # rows ---------------------------------------------------------------------------------------

    def align(self, teacher_ids: np.ndarray) -> AlignedRow:
        """One stored row as the student's: each document piece between separators re-tokenized
        and aligned, separators carried over as the student's end-of-text token (aligned with the
        teacher's, since both predict the next document's first token)."""
        ids: list[int] = []
        positions: list[int] = []
        label_bytes, truncated, inexact = 0, False, False
        cuts = np.flatnonzero(self._separators[teacher_ids])
        starts = np.concatenate([[0], cuts + 1])
        ends = np.concatenate([cuts, [len(teacher_ids)]])
        for k, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
            if k > 0:
                if len(ids) >= self.student_len:
                    truncated = True
                    break
                ids.append(self.separator)
                positions.append(a - 1)
            if b <= a:
                continue
            row = align_row(
                teacher_ids[a:b], self.teacher_bytes, self.tokenizer, self.student_bytes, self.student_len - len(ids)
            )
            if k > 0 and row.length and self.student_bytes is not None:
                label_bytes += int(self.student_bytes.lengths()[row.student_ids[0]])  # predicted by the separator
            ids += row.student_ids.tolist()
            positions += [p + a if p >= 0 else -1 for p in row.teacher_pos.tolist()]
            label_bytes += row.label_bytes
            truncated, inexact = truncated or row.truncated, inexact or row.inexact
            if row.truncated:
                break
        return AlignedRow(
            student_ids=np.asarray(ids, dtype=np.int64),
            teacher_pos=np.asarray(positions, dtype=np.int64),
            length=len(ids),
            truncated=truncated,
            label_bytes=label_bytes,
            inexact=inexact,
        )

    def expand(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Adds the student's rows: ``student_ids`` [rows, student_len] (padded),
        ``student_lengths``, ``teacher_pos`` (-1: unaligned or padding), ``row_label_bytes``,
        ``truncated``."""
        if "student_ids" in arrays:
            return arrays
        rows = [self.align(r) for r in arrays["input_ids"]]
        n, width = len(rows), self.student_len
        ids = np.full((n, width), self.separator, dtype=np.int64)
        pos = np.full((n, width), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : r.length], pos[i, : r.length] = r.student_ids, r.teacher_pos
        return {
            **arrays,
            "student_ids": ids,
            "teacher_pos": pos,
            "student_lengths": np.array([r.length for r in rows], dtype=np.int64),
            "row_label_bytes": np.array([r.label_bytes for r in rows], dtype=np.int64),
            "truncated": np.array([r.truncated for r in rows], dtype=bool),
        }

    def model_inputs(self, arrays: dict[str, np.ndarray], device=None) -> dict[str, torch.Tensor]:
        return {"input_ids": to_device(self.expand(arrays)["student_ids"], np.int64, device)}

    def labels(self, arrays: dict[str, np.ndarray], device=None) -> torch.Tensor:
        """The student's next tokens; none past a row's end (padding is never a label)."""
        arrays = self.expand(arrays)
        labels = next_token_labels(to_device(arrays["student_ids"], np.int64, device))
        lengths = to_device(arrays["student_lengths"], np.int64, labels.device)
        positions = torch.arange(labels.shape[1], device=labels.device)
        return labels.masked_fill(positions[None, :] >= (lengths[:, None] - 1), IGNORE)

    def teacher_labels(self, arrays: dict[str, np.ndarray], device=None) -> torch.Tensor:
        return next_token_labels(to_device(arrays["input_ids"], np.int64, device))

    def gather_targets(self, targets, arrays: dict[str, np.ndarray]) -> AlignedTargets:
        """The teacher's targets at the aligned positions, one row per aligned student position."""
        arrays = self.expand(arrays)
        pos = torch.from_numpy(arrays["teacher_pos"])
        rows, cols = torch.nonzero(pos >= 0, as_tuple=True)
        at = (rows, pos[rows, cols])
        if isinstance(targets, DenseTargets):
            targets = _sparse_from_dense(targets.logprobs[at])
            return AlignedTargets(targets, pos >= 0)
        tail = None if targets.tail_mass is None else targets.tail_mass[at]
        return AlignedTargets(SparseTargets(targets.ids[at], targets.probs[at], tail), pos >= 0)

    def teacher_argmax(self, arrays: dict[str, np.ndarray], teacher_top1: np.ndarray) -> torch.Tensor:
        """The teacher's argmax at aligned positions, in student ids where its bytes are a student
        token's (-1 elsewhere: an agreement there is impossible, not a miss of the student's)."""
        arrays = self.expand(arrays)
        pos = arrays["teacher_pos"]
        out = np.full(pos.shape, -1, dtype=np.int64)
        mapped = self.vocab_map
        if mapped is None:
            return torch.from_numpy(out)
        rows, cols = np.nonzero(pos >= 0)
        teacher = teacher_top1[rows, pos[rows, cols]]
        out[rows, cols] = mapped.teacher_to_student.numpy()[teacher]
        return torch.from_numpy(out)

    def label_bytes(self, arrays: dict[str, np.ndarray], pieces=None) -> np.ndarray:
        return self.expand(arrays)["row_label_bytes"]


def _sparse_from_dense(logprobs: torch.Tensor, k: int = DENSE_TO_SPARSE_K) -> SparseTargets:
    """The k most likely ids of dense log-probs [N, V] and the mass they leave (exact when k >= V)."""
    k = min(k, logprobs.shape[-1])
    top, ids = logprobs.float().topk(k, dim=-1)
    probs = top.exp()
    return SparseTargets(ids, probs, (1.0 - probs.sum(-1)).clamp_min(0.0))


def aligned_fraction_of(task: CrossTokenizerLM, teacher_rows: np.ndarray) -> tuple[float, float]:
    """(aligned share of the student's positions, share of rows cut at student_len) over rows."""
    rows = [task.align(r) for r in teacher_rows]
    return aligned_fraction(rows), (sum(r.truncated for r in rows) / len(rows) if rows else 0.0)
