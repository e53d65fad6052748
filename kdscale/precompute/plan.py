"""Planning a precompute (driver side, no Ray): tokenize and pack the corpus, fingerprint teacher,
tokenizer and data, derive the cache_id, and cut the rows into deterministic shard tasks.

The same plan is rebuilt on resume; because every input to it is content-addressed, a rerun
produces the same shard names, the same rows per shard, and the same cache_id."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from kdscale.cache import idcodec
from kdscale.cache.format import (
    FORMAT_VERSION,
    DatasetInfo,
    Split,
    TargetsInfo,
    TeacherInfo,
    TokenizerInfo,
    shard_name,
)
from kdscale.cache.kinds import kind as target_kind
from kdscale.config import JobSpec
from kdscale.data.corpus import PackedCorpus, pack_corpus, seq_id
from kdscale.fingerprint import cache_id as make_cache_id
from kdscale.fingerprint import tokenizer_fingerprint
from kdscale.models.sharding import layer_ranges
from kdscale.teachers import backend as teacher_backend
from kdscale.teachers import load_teacher_config, serving_problems, teacher_identity
from kdscale.tracking.redact import redact

if TYPE_CHECKING:
    from kdscale.data.images import ImageCorpus


@dataclass
class ShardTask:
    name: str
    split: Split
    index: int
    columns: dict[str, np.ndarray]  # the rows' inputs: input_ids [rows, seq_len]; or pixels + labels
    seq_ids: list[str]
    positions: int  # predicted positions in all rows (tokens; one per image)

    @property
    def input_ids(self) -> np.ndarray:
        return self.columns["input_ids"]

    @property
    def tokens(self) -> int:
        return self.positions

    @property
    def rows(self) -> int:
        return len(self.seq_ids)


@dataclass
class PrecomputePlan:
    cache_id: str
    targets: TargetsInfo
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    dataset: DatasetInfo
    rank_order: np.ndarray  # id-coding table: token ids by descending corpus frequency
    layer_ranges: list[tuple[int, int]]  # one [start, end) per pipeline stage
    tasks: list[ShardTask] = field(default_factory=list)

    @property
    def rank(self) -> np.ndarray:
        return idcodec.inverse(self.rank_order)


class PlanError(ValueError):
    """The spec is well-formed but cannot be run (e.g. the corpus yields no sequences)."""


def logit_width(spec: JobSpec, teacher_config) -> int:
    """The teacher's output width: its LM head (possibly padded past the tokenizer) or its classes."""
    return teacher_config.vocab_size if spec.task == "causal_lm" else teacher_config.num_labels


def tokenizer_info(tokenizer, logit_width: int) -> TokenizerInfo:
    return TokenizerInfo(
        fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_size=len(tokenizer),
        logit_width=logit_width,
        eos_token_id=tokenizer.eos_token_id,
    )


def check_teacher_fits(spec: JobSpec, teacher_config, vocab_size: int) -> list[tuple[str, str]]:
    """Problems that only show once the teacher's config and tokenizer are known."""
    problems = []
    width = logit_width(spec, teacher_config)
    if width < vocab_size:
        problems.append(("teacher", f"logit width {width} is smaller than the tokenizer's vocabulary {vocab_size}"))
    context = getattr(teacher_config, "max_position_embeddings", None)
    if context and spec.corpus.seq_len > context:
        problems.append(("corpus.seq_len", f"{spec.corpus.seq_len} exceeds the teacher's context length {context}"))
    kind = target_kind(spec.cache.targets.kind)
    problems += kind.problems(spec.cache.targets, vocab_size)
    online = [i for i, s in enumerate(spec.students) if s.targets == "online"]
    problems += serving_problems(teacher_backend(spec.teacher), kind, online)
    if spec.teacher.shards > 1:
        problems += _sharding_problems(spec, teacher_config)
    return problems


def _sharding_problems(spec: JobSpec, teacher_config) -> list[tuple[str, str]]:
    """A sharded teacher needs at least one layer per stage and a Llama-like layout; the layout
    is checked on an empty (meta-device) instance, so no weights are read."""
    from kdscale.models.sharding import ShardingError, decoder_parts

    layers = getattr(teacher_config, "num_hidden_layers", None)
    if layers is None:
        return [("teacher.shards", "the teacher's config has no num_hidden_layers to split")]
    if spec.teacher.shards > layers:
        return [("teacher.shards", f"{spec.teacher.shards} stages for a teacher with only {layers} layers")]
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(teacher_config)
    try:
        decoder_parts(empty)
    except ShardingError as e:
        return [("teacher.shards", str(e))]
    return []


def shard_tasks(split: Split, rows: list[np.ndarray], per_shard: int) -> list[ShardTask]:
    """Cut one split into consecutive shards of `per_shard` rows (deterministic names)."""
    tasks = []
    for index, start in enumerate(range(0, len(rows), per_shard)):
        block = np.stack(rows[start : start + per_shard]).astype(np.int32)
        tasks.append(
            ShardTask(
                shard_name(split, index),
                split,
                index,
                {"input_ids": block},
                [seq_id(r) for r in block],
                int(block.size),
            )
        )
    return tasks


def image_shard_tasks(split: Split, examples: list[tuple[np.ndarray, int]], per_shard: int) -> list[ShardTask]:
    """Cut one split of (pixels, label) examples into shards of `per_shard` images."""
    from kdscale.data.images import example_id

    tasks = []
    for index, start in enumerate(range(0, len(examples), per_shard)):
        chunk = examples[start : start + per_shard]
        pixels = np.stack([x for x, _ in chunk]).astype(np.uint8)
        labels = np.asarray([[y] for _, y in chunk], dtype=np.int32)
        tasks.append(
            ShardTask(
                shard_name(split, index),
                split,
                index,
                {"pixels": pixels, "labels": labels},
                [example_id(x, y) for x, y in chunk],
                len(chunk),
            )
        )
    return tasks


def targets_info(spec: JobSpec) -> TargetsInfo:
    t = spec.cache.targets
    kind = target_kind(t.kind)
    return TargetsInfo(
        kind=t.kind,
        temperature=t.temperature,
        num_samples=t.num_samples if kind.uses_num_samples else None,
        k=t.k if kind.uses_k else None,
        store_logprobs=t.store_logprobs and kind.optional_logprobs,
        seed=spec.seed,
        draws=t.draws,
    )


def build_plan(spec: JobSpec, tokenizer, corpus: PackedCorpus | ImageCorpus | None = None) -> PrecomputePlan:
    """``tokenizer``: the teacher's tokenizer, or for images the image task (its label space)."""
    images = spec.task == "image_classification"
    teacher_config = load_teacher_config(spec.teacher, len(tokenizer), spec.task)
    problems = check_teacher_fits(spec, teacher_config, len(tokenizer))
    if problems:
        from kdscale.config import ConfigError

        raise ConfigError(spec.name, problems)
    if corpus is None:
        if images:
            from kdscale.data.images import IdxError, load_images

            try:
                corpus = load_images(spec.corpus)
            except IdxError as e:
                raise PlanError(str(e)) from None
        else:
            corpus = pack_corpus(spec.corpus, tokenizer)
    if not corpus.train:
        raise PlanError(
            f"the corpus yields no training sequences of {spec.corpus.seq_len} tokens "
            f"({corpus.documents} non-empty documents read from {spec.corpus.paths})"
            if not images
            else f"no training images in {spec.corpus.paths}"
        )
    if not corpus.heldout:
        raise PlanError(
            f"the corpus yields no held-out sequences ({len(corpus.train)} sequences, heldout_fraction "
            f"{spec.corpus.heldout_fraction}); use more text or a larger heldout_fraction"
        )
    if spec.corpus.validation_fraction and not corpus.validation:
        raise PlanError(
            f"the corpus yields no validation sequences ({len(corpus.train)} sequences, validation_fraction "
            f"{spec.corpus.validation_fraction}); use more text or a larger validation_fraction"
        )
    identity = teacher_identity(spec.teacher, len(tokenizer), spec.seed, spec.task)
    ranges = layer_ranges(teacher_config, spec.teacher.shards)
    teacher = TeacherInfo(
        name=identity.name,
        fingerprint=identity.fingerprint,
        dtype=identity.dtype,
        source=identity.source,
        parallelism={"replicas": spec.teacher.replicas, "shards": spec.teacher.shards, "layer_ranges": ranges},
    )
    tok = tokenizer_info(tokenizer, logit_width(spec, teacher_config))
    dataset = DatasetInfo(
        task=tokenizer.describe() if images else {"name": "causal_lm"},
        sources=redact(corpus.sources),  # a password in a corpus URL never reaches the manifest
        patterns=redact(list(spec.corpus.paths)),
        documents=corpus.documents,
        content_hash=corpus.content_hash(),
        seq_len=corpus.seq_len,
        heldout_fraction=spec.corpus.heldout_fraction,
        validation_fraction=spec.corpus.validation_fraction,
        rows={split: len(rows) for split, rows in corpus.splits.items() if split != "validation" or rows},
        tokens=corpus.tokens,
    )
    targets = targets_info(spec)
    cid = make_cache_id(teacher.fingerprint, tok.fingerprint, dataset.content_hash, targets.params(), FORMAT_VERSION)
    per_shard = spec.cache.rows_per_shard
    cut: Callable[..., list[ShardTask]] = image_shard_tasks if images else shard_tasks
    tasks = [task for split, rows in corpus.splits.items() for task in cut(split, rows, per_shard)]
    # id coding ranks the output ids by frequency: tokens in the corpus, or the images' labels
    if images:
        everything = corpus.all_labels()  # type: ignore[union-attr]  # an ImageCorpus
    else:
        everything = np.concatenate([r for rows in corpus.splits.values() for r in rows])
    order = idcodec.rank_table(everything, tok.vocab_size)
    return PrecomputePlan(cid, targets, teacher, tok, dataset, order, ranges, tasks)
