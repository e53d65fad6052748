"""The logit cache's on-disk contract (format v1): manifest schema, column names, file names.

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
target_ids          list<int32>            ``sampled``: unique sampled ids, ascending within
                                           each position, positions concatenated;
                                           ``topk``: k ids per position, best first
target_counts       list<uint8>            ``sampled``: draw count of each stored id
target_lengths      list<uint8|uint16>     ``sampled``: unique ids per position
target_logprobs     list<float32>          ``topk``: log-probs at the capture temperature;
                                           ``full``: dense log-probs, seq_len x vocab
tail_mass           list<float32>          ``topk``: probability not covered by the k ids
teacher_top1        list<int32>            heldout split only: teacher argmax per position
==================  =====================  ===============================================

Targets at position i describe the teacher's distribution of the token *after* input_ids[i].
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LEDGER_DIR = "_ledger"
PLAN = "plan.json"
SPLITS = ("train", "heldout")

COLUMNS_BY_KIND: dict[str, tuple[str, ...]] = {
    "sampled": ("target_ids", "target_counts", "target_lengths"),
    "topk": ("target_ids", "target_logprobs", "tail_mass"),
    "full": ("target_logprobs",),
}
BASE_COLUMNS = ("seq_id", "input_ids", "teacher_nll")
HELDOUT_EXTRA_COLUMNS = ("teacher_top1",)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.parquet"


class CacheFormatError(RuntimeError):
    """A cache that cannot be used: incomplete, corrupted, another format version, or made for
    another tokenizer. The message always says which and what to do."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TargetsInfo(_Model):
    kind: Literal["sampled", "topk", "full"]
    temperature: float
    num_samples: int | None = None
    k: int | None = None
    seed: int

    def params(self) -> dict[str, Any]:
        """The parameters that change the stored targets (part of the cache_id)."""
        return self.model_dump()


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


class DatasetInfo(_Model):
    sources: list[str]
    patterns: list[str]
    documents: int
    content_hash: str
    seq_len: int
    heldout_fraction: float
    rows: dict[str, int]
    tokens: int


class ShardRecord(_Model):
    path: str = Field(..., description="File name relative to the cache folder.")
    split: Literal["train", "heldout"]
    index: int
    rows: int
    tokens: int
    bytes: int
    sha256: str
    target_bytes: int = Field(..., description="Compressed bytes of the target columns alone.")
    unique_ids: int = Field(0, description="Stored (id, weight) pairs in this shard.")
    tail_mass_sum: float = 0.0
    teacher_nll_sum: float = 0.0


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
    shards: list[ShardRecord]
    totals: dict[str, Any]

    def shards_of(self, split: str) -> list[ShardRecord]:
        return [s for s in self.shards if s.split == split]
