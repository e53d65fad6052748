"""What a task changes: the model class, how stored rows become model inputs, and the labels.

kdscale distills any model whose output is a distribution at each *position* of a row: a causal
LM predicts the next token at every one of a row's ``seq_len`` positions; an image classifier
predicts one class per image (a row with one position). The cache format, the target kinds, the
losses, the training loop and the evaluation are shared; a task is only this adapter, so adding
one touches nothing else. No Ray, no DeepSpeed here.

Rows travel as columns (numpy arrays, one row per first axis): ``input_ids`` [rows, seq_len]
for a causal LM; ``pixels`` [rows, C*H*W] uint8 and ``labels`` [rows, 1] for images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch

IGNORE = -100


def to_device(array: np.ndarray, dtype, device=None) -> torch.Tensor:
    """A batch column as a tensor on ``device``: through pinned host memory and an asynchronous
    copy when that is a GPU (the copy overlaps the previous step's kernels), as is on the CPU."""
    t = torch.from_numpy(np.array(array, dtype=dtype))  # a copy: columns read from Parquet are read-only
    if device is not None and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t if device is None else t.to(device)


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Labels aligned with logits: position i predicts input_ids[i+1]; the last has no label."""
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def table_arrays(table: pa.Table, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named list columns of a batch of rows as [rows, width] arrays (every row of a cache
    has the same width per column)."""
    out = {}
    for name in names:
        column = table.column(name)
        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        values = arr.flatten().to_numpy(zero_copy_only=False)
        out[name] = values.reshape(table.num_rows, -1) if table.num_rows else values.reshape(0, 0)
    return out


class StoredRows:
    """What a student with its own tokenizer changes (kdscale.models.cross_task), as it is for
    every other student: its rows are the cache's rows, its targets the decoded ones."""

    def labels(self, arrays: dict[str, np.ndarray], device=None) -> torch.Tensor:
        raise NotImplementedError

    def expand(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The stored rows' columns plus whatever the student's inputs are made from (nothing more here)."""
        return arrays

    def teacher_labels(self, arrays: dict[str, np.ndarray], device=None) -> torch.Tensor:
        """What each stored position's teacher target predicts (the teacher's own labels)."""
        return self.labels(arrays, device)

    def gather_targets(self, targets, arrays: dict[str, np.ndarray]):
        """The decoded teacher targets as this task's loss takes them."""
        return targets

    def teacher_argmax(self, arrays: dict[str, np.ndarray], teacher_top1: np.ndarray) -> torch.Tensor:
        """The teacher's argmax at each student position in the student's ids (-1: none)."""
        return torch.from_numpy(teacher_top1.astype(np.int64))

    def label_bytes(self, arrays: dict[str, np.ndarray], pieces) -> np.ndarray | None:
        """Bytes of text each row's labels cover, for bits per byte (None: not text)."""
        return None


@dataclass(frozen=True)
class CausalLM(StoredRows):
    """Next-token prediction over packed token sequences."""

    name: ClassVar[str] = "causal_lm"
    input_columns: ClassVar[tuple[str, ...]] = ("input_ids",)

    @staticmethod
    def auto_model():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    @staticmethod
    def output_size(config) -> int:
        return config.vocab_size

    @staticmethod
    def set_output_size(config_fields: dict[str, Any], n: int) -> None:
        config_fields["vocab_size"] = n

    def model_inputs(self, arrays: dict[str, np.ndarray], device=None) -> dict[str, torch.Tensor]:
        return {"input_ids": to_device(arrays["input_ids"], np.int64, device)}

    def labels(self, arrays: dict[str, np.ndarray], device=None) -> torch.Tensor:
        return next_token_labels(self.model_inputs(arrays, device)["input_ids"])

    @staticmethod
    def logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**inputs).logits

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

    def label_bytes(self, arrays: dict[str, np.ndarray], pieces) -> np.ndarray | None:
        """Bytes of text each row's labels cover (bits per byte), from the teacher vocabulary's
        bytes (``pieces``, a TokenBytes; None: unknown)."""
        from kdscale.data.alignment import teacher_label_bytes

        if pieces is None:
            return None
        return np.array([teacher_label_bytes(row, pieces) for row in arrays["input_ids"]], dtype=np.int64)


@dataclass(frozen=True)
class ImageClassification(StoredRows):
    """One class per image. Pixels are stored as raw uint8 and normalised here, the way the
    teacher was trained (``mean``/``std`` per channel after scaling to [0, 1]), so the cache
    keeps the data exact and small and the normalisation is part of the input contract."""

    input_shape: tuple[int, int, int]  # channels, height, width
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    labels_names: tuple[str, ...] = field(default=())

    name: ClassVar[str] = "image_classification"
    input_columns: ClassVar[tuple[str, ...]] = ("pixels", "labels")

    @staticmethod
    def auto_model():
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification

    @staticmethod
    def output_size(config) -> int:
        return config.num_labels

    def set_output_size(self, config_fields: dict[str, Any], n: int) -> None:
        """n classes named as the task's labels (the teacher's), so exports say what they predict."""
        names = self.labels_names if len(self.labels_names) == n else tuple(str(i) for i in range(n))
        config_fields.pop("num_labels", None)
        config_fields["id2label"] = {i: name for i, name in enumerate(names)}
        config_fields["label2id"] = {name: i for i, name in enumerate(names)}

    def model_inputs(self, arrays: dict[str, np.ndarray], device=None) -> dict[str, torch.Tensor]:
        c, h, w = self.input_shape
        x = to_device(arrays["pixels"], np.uint8, device).to(torch.float32) / 255.0
        x = x.reshape(-1, c, h, w)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
        return {"pixel_values": (x - mean) / std}

    def labels(self, arrays: dict[str, np.ndarray], device=None) -> torch.Tensor:
        return to_device(arrays["labels"], np.int64, device).reshape(-1, 1)

    @staticmethod
    def logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**inputs).logits[:, None, :]  # one position per image

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "mean": list(self.mean),
            "std": list(self.std),
            "labels": list(self.labels_names),
        }

    # The task plays the tokenizer's part for images: it fixes the output vocabulary (the label
    # names) and how inputs are encoded, so the cache fingerprints it and exports carry it.
    eos_token_id: ClassVar[None] = None

    def __len__(self) -> int:
        return len(self.labels_names)

    def fingerprint(self) -> str:
        from kdscale.fingerprint import digest

        return digest(self.describe())

    def save_pretrained(self, folder: str) -> None:
        """An image processor config beside the exported model, so transformers' pipelines and
        AutoImageProcessor feed it inputs normalised as in training."""
        try:  # the PIL backend needs no torchvision (recent transformers; older ones have only this one)
            from transformers import ViTImageProcessorPil as ViTImageProcessor
        except ImportError:
            from transformers import ViTImageProcessor  # type: ignore[assignment]

        c, h, w = self.input_shape
        ViTImageProcessor(
            do_resize=True,
            size={"height": h, "width": w},
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=list(self.mean),
            image_std=list(self.std),
            do_convert_rgb=c == 3,
        ).save_pretrained(folder)


Task = CausalLM | ImageClassification  # (kdscale.models.cross_task.CrossTokenizerLM is a CausalLM)


TASK_CLASSES: dict[str, type[CausalLM] | type[ImageClassification]] = {
    CausalLM.name: CausalLM,
    ImageClassification.name: ImageClassification,
}


def task_from_dict(d: dict[str, Any]) -> Task:
    """Rebuild a task from :meth:`describe` (how it travels to training workers)."""
    if d["name"] == CausalLM.name:
        return CausalLM()
    if d["name"] == ImageClassification.name:
        return ImageClassification(tuple(d["input_shape"]), tuple(d["mean"]), tuple(d["std"]), tuple(d["labels"]))
    if d["name"] == "cross_tokenizer_lm":
        from kdscale.models.cross_task import CrossTokenizerLM

        return CrossTokenizerLM(d["tokenizer"], d["cache_uri"], int(d["student_len"]))
    raise ValueError(f"unknown task {d['name']!r} (known: {', '.join(TASK_CLASSES)})")
