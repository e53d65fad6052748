"""The logit cache's on-disk contract (format v2): manifest schema, column names, file names.

Format 2 (text corpora cut into input units, :mod:`kdscale.data.units`) adds ``dataset.units``
(each unit's pieces, content hash, rows and shards) and ``dataset.identity`` (the hash of the
units' descriptors and the packing settings), which the cache_id is computed over instead of the
content hash, so a cache is named before its corpus is read. Format 1 caches (the whole corpus
packed in the driver; the cache_id over the content hash) are still read and verified.

A cache is a folder (any fsspec URI) of Parquet shards plus ``manifest.json``. Shards are written
first under deterministic names; the manifest is written last and *is* the commit (mosaicml
streaming's rule). ``_ledger/`` records finished shards so an interrupted precompute resumes.

Row layout (one packed sequence of ``seq_len`` tokens per row):

==================  =====================  ===============================================
column              type                   meaning
==================  =====================  ===============================================
seq_id              string                 blake2b-64 of the int32 token ids
input_ids           list<int32>            the packed tokens
teacher_nll         float32                sum of the teacher's next-token NLL (T=1) over
                                           the row's seq_len-1 predicted positions
target_ids          list<int32>            id-coded (see below) target ids, positions
                                           concatenated: ``sampled``: the unique sampled ids
                                           (with ``draws`` R > 1: R segments per position,
                                           position-major); ``topk``/``stratified``: the k
                                           most likely ids
target_counts       list<uint8>            ``sampled``: draw count of each stored id
target_lengths      list<uint8>            ``sampled``: unique ids per position (per draw)
target_logprobs     list<float32>          ``topk``/``stratified`` (and ``sampled`` with
                                           store_logprobs): teacher log-probs of the stored
                                           ids at the capture temperature; ``full``: dense,
                                           seq_len x vocab
tail_mass           list<float32>          ``topk``/``stratified``: probability not covered
                                           by the k ids
tail_ids            list<int32>            ``stratified``: id-coded unique ids of M draws from
                                           the teacher's distribution renormalised outside
                                           the k ids
tail_counts         list<uint8>            ``stratified``: draw count of each tail id
tail_lengths        list<uint8>            ``stratified``: unique tail ids per position
teacher_top1        list<int32>            heldout and validation splits only: teacher
                                           argmax per position
==================  =====================  ===============================================

Targets at position i describe the teacher's distribution of the token *after* input_ids[i].

Image classification (``dataset.task.name == "image_classification"``): a row is one image with
one position; ``input_ids`` is replaced by ``pixels`` (list<uint8>, C*H*W raw values; the
normalisation is in ``dataset.task``) and ``labels`` (list<int32>, the class); ``seq_len`` is 1
and "tokens" count images. The target columns are the same, over the label vocabulary.

Id coding (``manifest.id_coding``, scheme ``rank-delta``): each id is replaced by its rank in
``vocab_rank.parquet`` (tokens by descending corpus frequency), ranks are sorted within each
position and stored as the first rank followed by gaps; companion columns follow the same order.
See :mod:`kdscale.cache.idcodec`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
LEDGER_DIR = "_ledger"
PLAN = "plan.json"
Split = Literal["train", "heldout", "validation"]
SPLITS: tuple[Split, ...] = ("train", "heldout", "validation")  # the order shards are listed in
EVAL_SPLITS = ("heldout", "validation")  # scored, never trained on; validation is optional

ID_CODING_SCHEME = "rank-delta"
# The teacher vocabulary's bytes (kdscale.data.alignment.TokenBytes): with the rows' token ids they
# give every row's text and each token's byte span exactly, for students with their own tokenizer.
# One table per cache (~0.4 MB for a 49k vocabulary) instead of spans per row (>= 1 byte/token).
TOKEN_BYTES_FILE = "token_bytes.parquet"


def target_columns(kind: str, store_logprobs: bool = False) -> tuple[str, ...]:
    """The columns holding a target kind's data (what ``target_bytes`` counts)."""
    from kdscale.cache.kinds import kind as target_kind

    return target_kind(kind).columns(store_logprobs)


BASE_COLUMNS = ("seq_id", "input_ids", "teacher_nll")
IMAGE_BASE_COLUMNS = ("seq_id", "pixels", "labels", "teacher_nll")
HELDOUT_EXTRA_COLUMNS = ("teacher_top1",)


def base_columns(task: str = "causal_lm") -> tuple[str, ...]:
    """A row's identity, model inputs (and, for images, labels) and the teacher's summed NLL."""
    return BASE_COLUMNS if task == "causal_lm" else IMAGE_BASE_COLUMNS


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.parquet"


class CacheFormatError(RuntimeError):
    """A cache that cannot be used: incomplete, corrupted, another format version, or made for
    another tokenizer. The message always says which and what to do."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TargetsInfo(_Model):
    kind: Literal["sampled", "topk", "full", "stratified"]
    temperature: float
    num_samples: int | None = Field(None, description="sampled: draws per position; stratified: tail draws.")
    k: int | None = Field(None, description="topk: ids kept; stratified: ids kept exactly.")
    store_logprobs: bool = False
    seed: int
    draws: int = Field(1, description="sampled: independent draws per position; epoch e trains on draw e mod draws.")

    def params(self) -> dict[str, Any]:
        """The parameters that change the stored targets (part of the cache_id). ``draws`` joins
        only when it is not 1, so caches made before it existed keep their cache_id."""
        params = self.model_dump()
        if self.draws == 1:
            params.pop("draws")
        return params


class TeacherInfo(_Model):
    name: str
    fingerprint: str
    dtype: str
    source: dict[str, Any]
    parallelism: dict[str, Any]


class TokenizerInfo(_Model):
    fingerprint: str
    vocab_size: int = Field(..., description="True vocabulary size (len(tokenizer)); targets never exceed it.")
    logit_width: int = Field(..., description="The teacher's (possibly padded) output width; sliced to vocab_size.")
    eos_token_id: int | None


class UnitRecord(_Model):
    """One input unit as packed: what it was read from, and what it gave."""

    index: int
    pieces: list[dict[str, Any]] = Field(..., description="uri, fmt, start, end, size, version of each piece.")
    content_hash: str = Field(..., description="sha256 over the unit's row ids and splits, in packing order.")
    documents: int
    tokens: int = Field(..., description="Tokens in the unit's rows (after a max_tokens cut).")
    dropped_tokens: int = Field(..., description="The unit's packing tail that did not fill a row.")
    rows: dict[str, int]
    shards: list[str]


class DatasetInfo(_Model):
    task: dict[str, Any] = Field(
        default_factory=lambda: {"name": "causal_lm"},
        description="The task and, for images, input shape, normalisation and label names.",
    )
    sources: list[str]
    patterns: list[str]
    documents: int
    content_hash: str
    seq_len: int
    heldout_fraction: float
    validation_fraction: float = 0.0
    rows: dict[str, int]
    tokens: int
    identity: str | None = Field(
        None, description="v2: hash of the units' descriptors and packing settings (what the cache_id is over)."
    )
    units: list[UnitRecord] | None = Field(None, description="v2: every input unit, in corpus order.")
    dropped_tokens: int = Field(0, description="v2: tokens dropped at unit ends (packing tails).")

    @property
    def fingerprint(self) -> str:
        """What the cache_id is computed over: the units' identity (v2), else the content hash."""
        return self.identity or self.content_hash

    @property
    def task_name(self) -> str:
        return self.task["name"]

    def labelled_per_row(self) -> int:
        """Positions per row with a label: all but the last token (causal LM), the image's one."""
        return self.seq_len - 1 if self.task_name == "causal_lm" else self.seq_len


class ShardRecord(_Model):
    path: str = Field(..., description="File name relative to the cache folder.")
    split: Split
    index: int
    rows: int
    tokens: int
    bytes: int
    sha256: str
    target_bytes: int = Field(..., description="Compressed bytes of the target columns alone.")
    unique_ids: int = Field(0, description="Stored (id, weight) pairs in this shard.")
    tail_mass_sum: float = 0.0
    teacher_nll_sum: float = 0.0
    node: str | None = Field(None, description="IP/node-id of the Ray node whose teacher actor wrote the shard.")


class Manifest(_Model):
    format_version: int
    cache_id: str
    kdscale_version: str
    created_at: str
    targets: TargetsInfo
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    dataset: DatasetInfo
    columns: dict[str, list[str]]
    id_coding: dict[str, Any] = Field(..., description="Scheme, rank file name and its sha256.")
    shards: list[ShardRecord]
    totals: dict[str, Any]
    alignment: dict[str, Any] | None = Field(
        None,
        description="token_bytes (file name), sha256 and digest of the teacher vocabulary's bytes; absent in "
        "caches made before kdscale aligned tokenizers (they cannot serve students with their own tokenizer).",
    )

    def shards_of(self, split: str) -> list[ShardRecord]:
        return [s for s in self.shards if s.split == split]
