"""Planning a precompute (driver side, no Ray): fingerprint teacher, tokenizer and data, derive
the cache_id, and say how rows become deterministic shard tasks.

A text corpus is planned from metadata alone: its input units (:mod:`kdscale.data.units`) and
their descriptors name the cache before any file is read; the rows arrive later, unit by unit
(:mod:`kdscale.precompute.feed`), and :func:`unit_shard_tasks` cuts each unit's rows into shards
numbered on from the units before it. An image corpus (a few IDX files) is still read here whole.
The same plan is rebuilt on resume, so a rerun produces the same shard names, the same rows per
shard, and the same cache_id."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from kdscale.cache import idcodec
from kdscale.cache.format import (
    FORMAT_VERSION,
    SPLITS,
    DatasetInfo,
    Split,
    TargetsInfo,
    TeacherInfo,
    TokenizerInfo,
    UnitRecord,
    shard_name,
)
from kdscale.cache.kinds import kind as target_kind
from kdscale.config import JobSpec
from kdscale.data.alignment import exact_token_bytes
from kdscale.data.corpus import PackedCorpus, pack_corpus, seq_id
from kdscale.fingerprint import cache_id as make_cache_id
from kdscale.fingerprint import tokenizer_fingerprint
from kdscale.models.sharding import layer_ranges
from kdscale.teachers import backend as teacher_backend
from kdscale.teachers import load_teacher_config, serving_problems, teacher_identity
from kdscale.tracking.redact import redact

if TYPE_CHECKING:
    from kdscale.data.images import ImageCorpus
    from kdscale.data.units import PackedUnit, Unit


@dataclass(frozen=True)
class UnitSlice:
    """Rows [start, stop) of one split of a packed unit (the rows stay in Ray's object store)."""

    unit: int
    start: int
    stop: int


@dataclass
class ShardTask:
    name: str
    split: Split
    index: int
    positions: int  # predicted positions in all rows (tokens; one per image)
    n_rows: int
    columns: dict[str, np.ndarray] | None = None  # input_ids [rows, seq_len]; or pixels + labels
    seq_ids: list[str] | None = None
    source: UnitSlice | None = None  # where the rows are until resolved

    @property
    def input_ids(self) -> np.ndarray:
        return self.resolved_columns["input_ids"]

    @property
    def resolved_columns(self) -> dict[str, np.ndarray]:
        if self.columns is None:
            raise RuntimeError(f"shard task {self.name}: rows not resolved from unit {self.source}")
        return self.columns

    @property
    def tokens(self) -> int:
        return self.positions

    @property
    def rows(self) -> int:
        return self.n_rows

    def resolve(self, packed: PackedUnit) -> ShardTask:
        """This task with its rows taken from the packed unit named by ``source``."""
        if self.source is None or self.columns is not None:
            return self
        s = self.source
        rows, ids = packed.split_slice(self.split, s.start, s.stop)
        return replace(self, columns={"input_ids": np.ascontiguousarray(rows, dtype=np.int32)}, seq_ids=ids)


def unit_shard_tasks(unit: int, split_rows: dict[str, int], next_index: dict[str, int], per_shard: int, seq_len: int):
    """One unit's shard tasks (no shard spans two units), numbered on from ``next_index``
    (updated), split by split in the manifest's order."""
    tasks = []
    for split in SPLITS:
        for start in range(0, split_rows.get(split, 0), per_shard):
            stop = min(start + per_shard, split_rows[split])
            index = next_index.get(split, 0)
            next_index[split] = index + 1
            name = shard_name(split, index)
            tasks.append(
                ShardTask(
                    name, split, index, (stop - start) * seq_len, stop - start, source=UnitSlice(unit, start, stop)
                )
            )
    return tasks


@dataclass
class PrecomputePlan:
    """What a precompute computes and under which cache_id. Images: the dataset, the rank table
    and every shard task are known here. Text: only the units (and ``corpus``, the settings the
    manifest records); rows, rank table and tasks come from the feed as units are packed."""

    cache_id: str
    targets: TargetsInfo
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    dataset: DatasetInfo | None  # images; text: made at commit from the units (:func:`text_dataset`)
    rank_order: np.ndarray | None  # id-coding table: token ids by descending corpus frequency
    layer_ranges: list[tuple[int, int]]  # one [start, end) per pipeline stage
    tasks: list[ShardTask] = field(default_factory=list)
    units: list[Unit] | None = None
    corpus: dict[str, Any] = field(default_factory=dict)  # text: patterns, packing settings, identity
    token_bytes: Any = None  # text: the vocabulary's bytes (alignment.TokenBytes), for students' own tokenizers

    @property
    def rank(self) -> np.ndarray:
        if self.rank_order is None:
            raise RuntimeError("the id-coding rank table is not known yet (it comes from the first units)")
        return idcodec.inverse(self.rank_order)

    @property
    def streamed(self) -> bool:
        return self.units is not None

    @property
    def data_fingerprint(self) -> str:
        """What the cache_id is over: the units' identity (text) or the content hash (images)."""
        return self.corpus["identity"] if self.streamed else self.dataset.content_hash


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
                int(block.size),
                len(block),
                columns={"input_ids": block},
                seq_ids=[seq_id(r) for r in block],
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
                len(chunk),
                len(chunk),
                columns={"pixels": pixels, "labels": labels},
                seq_ids=[example_id(x, y) for x, y in chunk],
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


def _identity(
    spec: JobSpec, tokenizer, teacher_config: Any = None
) -> tuple[Any, list[tuple[int, int]], TeacherInfo, TokenizerInfo, TargetsInfo]:
    """Teacher config, layer ranges and the teacher / tokenizer / targets records (checked).
    ``teacher_config``: the one the caller loaded (else loaded here: a GGUF teacher's config is
    parsed from the whole file's metadata, 4.1 s for SmolLM2-135M on this machine)."""
    if teacher_config is None:
        teacher_config = load_teacher_config(spec.teacher, len(tokenizer), spec.task)
    problems = check_teacher_fits(spec, teacher_config, len(tokenizer))
    if problems:
        from kdscale.config import ConfigError

        raise ConfigError(spec.name, problems)
    identity = teacher_identity(spec.teacher, len(tokenizer), spec.seed, spec.task)
    ranges = layer_ranges(teacher_config, spec.teacher.shards)
    teacher = TeacherInfo(
        name=identity.name,
        fingerprint=identity.fingerprint,
        dtype=identity.dtype,
        source=identity.source,
        parallelism={"replicas": spec.teacher.replicas, "shards": spec.teacher.shards, "layer_ranges": ranges},
    )
    return (
        teacher_config,
        ranges,
        teacher,
        tokenizer_info(tokenizer, logit_width(spec, teacher_config)),
        targets_info(spec),
    )


def build_text_plan(spec: JobSpec, tokenizer, token_bytes: Any = None, teacher_config: Any = None) -> PrecomputePlan:
    """A text corpus's plan from file metadata alone: its units and the cache_id they give.
    ``token_bytes``, ``teacher_config``: the vocabulary's bytes and the teacher's config where
    the caller has them (else computed here)."""
    from kdscale.data.corpus import corpus_files
    from kdscale.data.units import dataset_identity, list_units

    _, ranges, teacher, tok, targets = _identity(spec, tokenizer, teacher_config)
    c = spec.corpus
    files = corpus_files(c)
    if not files:
        raise PlanError(f"no corpus file matches {c.paths}")
    units = list_units(files, c.format, c.unit_bytes)
    packing = {
        "format": c.format,
        "field": c.field if c.format != "text" else None,
        "seq_len": c.seq_len,
        "heldout_fraction": c.heldout_fraction,
        "validation_fraction": c.validation_fraction,
        "max_tokens": c.max_tokens,
        "separator": tokenizer.eos_token_id,
    }
    identity = dataset_identity(units, packing)
    cid = make_cache_id(teacher.fingerprint, tok.fingerprint, identity, targets.params(), FORMAT_VERSION)
    corpus = {"identity": identity, "patterns": redact(list(c.paths)), **packing}
    return PrecomputePlan(
        cid,
        targets,
        teacher,
        tok,
        None,
        None,
        ranges,
        units=units,
        corpus=corpus,
        token_bytes=token_bytes if token_bytes is not None else exact_token_bytes(tokenizer),
    )


def text_dataset(plan: PrecomputePlan, units: list[UnitRecord]) -> DatasetInfo:
    """The manifest's dataset record of a text cache, from its packed units (in order)."""
    from kdscale.data.units import units_hash

    rows = {split: sum(u.rows.get(split, 0) for u in units) for split in SPLITS}
    if not rows["validation"]:
        rows.pop("validation")
    sources = list(dict.fromkeys(p["uri"] for u in units for p in u.pieces))
    c = plan.corpus
    return DatasetInfo(
        task={"name": "causal_lm"},
        sources=redact(sources),
        patterns=c["patterns"],
        documents=sum(u.documents for u in units),
        content_hash=units_hash(u.content_hash for u in units),
        seq_len=c["seq_len"],
        heldout_fraction=c["heldout_fraction"],
        validation_fraction=c["validation_fraction"],
        rows=rows,
        tokens=sum(u.tokens for u in units),
        identity=c["identity"],
        units=units,
        dropped_tokens=sum(u.dropped_tokens for u in units),
    )


def check_rows(rows: dict[str, int], documents: int, corpus, images: bool = False) -> None:
    """The packed corpus has rows to train on, to report on, and to validate on if asked for."""
    if not rows.get("train"):
        raise PlanError(
            f"no training images in {corpus.paths}"
            if images
            else f"the corpus yields no training sequences of {corpus.seq_len} tokens "
            f"({documents} non-empty documents read from {corpus.paths})"
        )
    if not rows.get("heldout"):
        raise PlanError(
            f"the corpus yields no held-out sequences ({rows['train']} sequences, heldout_fraction "
            f"{corpus.heldout_fraction}); use more text or a larger heldout_fraction"
        )
    if corpus.validation_fraction and not rows.get("validation"):
        raise PlanError(
            f"the corpus yields no validation sequences ({rows['train']} sequences, validation_fraction "
            f"{corpus.validation_fraction}); use more text or a larger validation_fraction"
        )


def build_plan(
    spec: JobSpec,
    tokenizer,
    corpus: PackedCorpus | ImageCorpus | None = None,
    token_bytes: Any = None,
    teacher_config: Any = None,
) -> PrecomputePlan:
    """``tokenizer``: the teacher's tokenizer, or for images the image task (its label space).
    A text corpus without ``corpus`` (rows packed by the caller) is planned from its units;
    ``token_bytes``, ``teacher_config``: its vocabulary's bytes and the teacher's config where
    the caller has them (:class:`kdscale.prepare.Prepared` does)."""
    images = spec.task == "image_classification"
    if corpus is None and not images:
        return build_text_plan(spec, tokenizer, token_bytes, teacher_config)
    teacher_config, ranges, teacher, tok, targets = _identity(spec, tokenizer, teacher_config)
    if corpus is None:
        if images:
            from kdscale.data.images import IdxError, load_images

            try:
                corpus = load_images(spec.corpus)
            except IdxError as e:
                raise PlanError(str(e)) from None
        else:
            corpus = pack_corpus(spec.corpus, tokenizer)
    check_rows({split: len(rows) for split, rows in corpus.splits.items()}, corpus.documents, spec.corpus, images)
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
