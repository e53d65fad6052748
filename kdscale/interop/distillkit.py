"""DistillKit's compressed top-k logit cache (arcee-ai/DistillKit, ``DistributionQuantizationConfig``),
decoded the way DistillKit's own ``LogprobCompressor.decompress_to_sparse`` decodes it.

A capture folder holds ``compression_config.yaml`` and shards ``data_<i>.parquet`` with the columns
``input_ids list<uint64>``, ``compressed_logprobs list<list<uint8>>`` and
``bytepacked_indices list<list<uint8>>``; the outer lists run over positions, the inner lists hold
one position's bytes:

- ``bytepacked_indices``: k token ids of ceil(log2 d) bits each, one most-significant-bit-first
  stream, zero-padded to whole bytes.
- ``compressed_logprobs``: exact_k raw little-endian ``exact_dtype`` values, one ``term_dtype``
  coefficient per polynomial term, then per residual bin one ``scale_dtype`` scale followed by its
  unsigned codes as an MSB-first stream padded to a byte.

The values are log-probs sorted descending. The first exact_k are stored; the other k - exact_k are
polynomial(t) + residual. With ``delta_encoding`` the stored sequence is the first value then the
successive differences.

Faithful means *DistillKit's* numbers, dtype for dtype, not a more exact evaluation of the same
formula: a consumer trained on DistillKit's decode and one trained on ours must see the same
targets. So the polynomial is evaluated with torch in ``term_dtype`` exactly as DistillKit does
(building the grid and terms of the residual-bins fixture's bfloat16 fit in float32 instead moves
log-probs by up to 0.2 nats; the fixture README quotes ~0.25), and torch's type promotion decides
the dtype of every sum. ``error_diffusion`` only changes how the
encoder chose the codes; decoding ignores it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, ValidationInfo, field_validator

from kdscale import fs
from kdscale.interop.rows import SourceError

Dtype = Literal["float16", "bfloat16", "float32", "float64"]
Term = StrictInt | Literal["sqrt", "exp"]

_TORCH: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
# the little-endian integer of each float's width: the bytes are read as these, then reinterpreted
_RAW = {"float16": "<i2", "bfloat16": "<i2", "float32": "<i4", "float64": "<i8"}
_WIDTH = {name: np.dtype(raw).itemsize for name, raw in _RAW.items()}

CONFIG_FILE = "compression_config.yaml"
_SHARD = re.compile(r"data_(\d+)\.parquet")
_COLUMNS = ("input_ids", "compressed_logprobs", "bytepacked_indices")
_LEGACY_COLUMNS = {"packed_indices", "exact_values", "coeffs"}
_LEGACY_KEYS = {"polynomial_degree", "vocab_size", "invert_polynomial", "with_sqrt_term"}
_LEGACY = (
    "legacy DistillKit schema (packed_indices / exact_values / coeffs, LegacyLogitCompressionConfig) is not "
    "supported; only the compressed_logprobs / bytepacked_indices format of DistributionQuantizationConfig is"
)


class DistillKitError(SourceError):
    """A DistillKit cache that cannot be read; the message names the file (and row) at fault.

    A :class:`SourceError` (a ``ValueError``) so ``kdscale cache import`` reports it and exits 2."""


def _distillkit_index_bits(d: int) -> int:
    """DistillKit's index width: ceil of a *float32* log2 (``LogprobCompressor.vocab_index_bits``)."""
    return int(torch.log2(torch.tensor(d, dtype=torch.float32)).ceil().item())


class ResidualBin(BaseModel):
    """One group of residuals quantised to ``element_bits``-bit codes with one shared scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale_dtype: Dtype
    # DistillKit declares `lte=64`, which pydantic ignores; its bit packer asserts 1..64, so we check it here
    element_bits: int = Field(ge=1, le=64)
    num_elements: int = Field(gt=0)

    def nbytes(self) -> int:
        """The scale, then the codes padded to a whole byte (DistillKit pads each bin separately)."""
        return _WIDTH[self.scale_dtype] + (self.element_bits * self.num_elements + 7) // 8


class DistillKitConfig(BaseModel):
    """``compression_config.yaml``: DistillKit's ``DistributionQuantizationConfig``, same fields,
    defaults and checks. Field checks live on the field they concern so an error names it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    d: int = Field(gt=0)
    k: int = Field(gt=0)
    exact_k: int = Field(ge=0)
    exact_dtype: Dtype = "float32"
    polynomial_terms: list[Term] | None = None
    term_dtype: Dtype = "float32"
    residual_bins: list[ResidualBin]
    delta_encoding: bool = True
    error_diffusion: bool = False
    normalize_t: bool = False

    @field_validator("d")
    @classmethod
    def _index_width_agrees(cls, d: int) -> int:
        # DistillKit packs ids with a float32 log2; from d = 2**21 + 1 on that is one bit short of
        # what ids up to d - 1 need, and DistillKit's packer masks the top bit away: refuse it.
        exact, theirs = (d - 1).bit_length(), _distillkit_index_bits(d)
        if exact != theirs:
            raise ValueError(f"d={d} needs {exact}-bit ids but DistillKit packs {theirs} bits (float32 log2)")
        return d

    @field_validator("exact_k")
    @classmethod
    def _exact_k_fits(cls, exact_k: int, info: ValidationInfo) -> int:
        k = info.data.get("k")
        if k is not None and exact_k > k:
            raise ValueError(f"exact_k ({exact_k}) must be <= k ({k})")
        return exact_k

    @field_validator("residual_bins")
    @classmethod
    def _tail_is_encoded(cls, bins: list[ResidualBin], info: ValidationInfo) -> list[ResidualBin]:
        k, exact_k = info.data.get("k"), info.data.get("exact_k")
        if k is None or exact_k is None:
            return bins
        if exact_k < k and not info.data.get("polynomial_terms") and not bins:
            raise ValueError(f"exact_k ({exact_k}) < k ({k}) needs polynomial_terms or residual_bins")
        covered = sum(b.num_elements for b in bins)
        if covered > k - exact_k:
            raise ValueError(f"the bins' num_elements sum to {covered}, more than k - exact_k = {k - exact_k}")
        return bins

    @property
    def terms(self) -> list[int | str]:
        return list(self.polynomial_terms or [])

    def index_bits(self) -> int:
        """ceil(log2 d), in integers (equal to DistillKit's float32 value: the ``d`` check)."""
        return (self.d - 1).bit_length()

    def logprob_bytes(self) -> int:
        """Bytes of ``compressed_logprobs`` per position (DistillKit's ``logprob_bits() / 8``)."""
        exact = self.exact_k * _WIDTH[self.exact_dtype]
        return exact + len(self.terms) * _WIDTH[self.term_dtype] + sum(b.nbytes() for b in self.residual_bins)

    def index_bytes(self) -> int:
        """Bytes of ``bytepacked_indices`` per position: k ids, one bit stream, padded to a byte."""
        return (self.k * self.index_bits() + 7) // 8

    def bytes_per_position(self) -> int:
        """DistillKit's ``total_bits() / 8``."""
        return self.logprob_bytes() + self.index_bytes()


def _problems(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        where = ".".join(str(part) for part in e["loc"]) or "(config)"
        lines.append(f"  - {where}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def parse_config(data: Any, where: str) -> DistillKitConfig:
    """A loaded ``compression_config.yaml`` (``where`` names it in errors) as a config."""
    if isinstance(data, dict) and _LEGACY_KEYS & set(data) and "d" not in data:
        raise DistillKitError(f"{where}: {_LEGACY}")
    try:
        return DistillKitConfig.model_validate(data)
    except ValidationError as e:
        raise DistillKitError(f"{where}: invalid DistillKit compression config:\n{_problems(e)}") from e


def load_config(uri: str) -> DistillKitConfig:
    """The config of the capture folder ``uri`` (local or any fsspec URI)."""
    path = fs.join(uri, CONFIG_FILE)
    if not fs.exists(path):
        raise DistillKitError(
            f"{path} not found: DistillKit's capture writes {CONFIG_FILE} beside the data_<i>.parquet shards, "
            "and the bytes cannot be decoded without it"
        )
    try:
        data = yaml.safe_load(fs.read_text(path))
    except yaml.YAMLError as e:
        raise DistillKitError(f"{path}: not valid YAML: {e}") from e
    return parse_config(data, path)


# Bytes to numbers ---------------------------------------------------------------------------------


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """``count`` unsigned ``bits``-bit values from MSB-first streams: uint8 ``[..., nbytes]`` to
    int64 ``[..., count]``. Extra trailing bits (the byte padding) are ignored; 64-bit values
    wrap to negative int64 as they do in DistillKit's torch unpacker."""
    if not 1 <= bits <= 64:
        raise DistillKitError(f"bit width must be 1..64, not {bits}")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim < 1:
        raise DistillKitError(f"bit streams must be uint8 arrays [..., nbytes], not {data.dtype} {data.shape}")
    needed, present = bits * count, data.shape[-1] * 8
    if needed > present:
        raise DistillKitError(f"truncated bit stream: {needed} bits needed, {present} present")
    stream = np.unpackbits(data, axis=-1, count=needed)  # bitorder="big": MSB first
    groups = stream.reshape(*data.shape[:-1], count, bits).astype(np.uint64)
    weights = np.left_shift(np.uint64(1), np.arange(bits - 1, -1, -1, dtype=np.uint64))
    return (groups * weights).sum(axis=-1, dtype=np.uint64).view(np.int64)


def _floats(raw: np.ndarray, at: int, count: int, dtype: str) -> tuple[torch.Tensor, int]:
    """``count`` little-endian ``dtype`` values per position from byte ``at``: a torch tensor
    ``[P, count]`` (torch, because numpy has no bfloat16) and the next byte offset."""
    end = at + count * _WIDTH[dtype]
    ints = np.ascontiguousarray(raw[:, at:end]).view(_RAW[dtype]).astype(_RAW[dtype][1:])  # to native order
    return torch.from_numpy(ints).view(_TORCH[dtype]), end


def _dequantize(codes: np.ndarray, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """DistillKit's ``dequantize``: codes in float32 times the scale (torch promotes to float64
    when the scale is float64). One-bit codes mean ±scale."""
    c = torch.from_numpy(codes)
    if bits == 1:
        return (c.to(torch.float32) * 2.0 - 1.0) * scale
    return (c + -(2 ** (bits - 1))).to(torch.float32) * scale


def _residuals(raw: np.ndarray, at: int, config: DistillKitConfig) -> torch.Tensor | None:
    """The bins' residuals ``[P, k - exact_k]``, zero past the last bin; None without bins."""
    parts = []
    for b in config.residual_bins:
        scale, at = _floats(raw, at, 1, b.scale_dtype)
        end = at + (b.element_bits * b.num_elements + 7) // 8
        parts.append(_dequantize(unpack_bits(raw[:, at:end], b.element_bits, b.num_elements), scale, b.element_bits))
        at = end
    if not parts:
        return None
    residual = torch.cat(parts, dim=-1)
    uncovered = config.k - config.exact_k - residual.shape[-1]
    return torch.nn.functional.pad(residual, (0, uncovered)) if uncovered else residual


def _term_matrix(config: DistillKitConfig, n: int) -> torch.Tensor:
    """The ``[n, terms]`` basis, built in ``term_dtype`` like DistillKit's decoder: with bfloat16
    the grid itself is rounded (linspace steps, t beyond 256) and so is every power of it."""
    dtype = _TORCH[config.term_dtype]
    t = torch.linspace(0, 1, steps=n, dtype=dtype) if config.normalize_t else torch.arange(n, dtype=dtype)
    columns = [t**term if isinstance(term, int) else getattr(torch, term)(t) for term in config.terms]
    return torch.stack(columns, dim=-1)


def _decode_logprobs(raw: np.ndarray, config: DistillKitConfig) -> np.ndarray:
    """``decompress_monotonic_logprobs`` for ``[P, logprob_bytes]``: float32 ``[P, k]``."""
    out = _TORCH[config.exact_dtype]  # DistillKit's default out_dtype
    exact, at = _floats(raw, 0, config.exact_k, config.exact_dtype)
    coeffs, at = _floats(raw, at, len(config.terms), config.term_dtype)
    residual = _residuals(raw, at, config)
    n = config.k - config.exact_k
    tail = torch.zeros((raw.shape[0], n), dtype=out) if residual is None else residual.to(out)
    if config.terms:  # the fit stays in term_dtype; adding the tail promotes (bf16 + f16 -> f32)
        tail = torch.sum(_term_matrix(config, n) * coeffs.unsqueeze(-2), dim=-1) + tail
    values = torch.cat([exact.to(out), tail], dim=-1)
    if config.delta_encoding:
        values = torch.cumsum(values.float(), dim=-1).to(out)
    return values.to(torch.float32).numpy()


def _check_width(data: np.ndarray, expected: int, name: str) -> np.ndarray:
    data = np.asarray(data)
    if data.ndim != 2 or data.dtype != np.uint8:
        raise DistillKitError(f"{name} must be a uint8 array [positions, bytes], not {data.dtype} {data.shape}")
    if data.shape[1] != expected:
        raise DistillKitError(f"{name}: expected {expected} bytes per position for this config, found {data.shape[1]}")
    return data


def decode_positions(
    logprob_bytes: np.ndarray, index_bytes: np.ndarray, config: DistillKitConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Positions' bytes (uint8 ``[P, logprob_bytes()]`` and ``[P, index_bytes()]``) to token ids
    int64 ``[P, k]`` and log-probs float32 ``[P, k]``, as DistillKit's ``decompress_to_sparse``."""
    lp = _check_width(logprob_bytes, config.logprob_bytes(), "compressed_logprobs")
    ix = _check_width(index_bytes, config.index_bytes(), "bytepacked_indices")
    if lp.shape[0] != ix.shape[0]:
        raise DistillKitError(f"{lp.shape[0]} positions of compressed_logprobs but {ix.shape[0]} of bytepacked_indices")
    return unpack_bits(ix, config.index_bits(), config.k), _decode_logprobs(lp, config)


# Files and rows -----------------------------------------------------------------------------------


@dataclass
class DistillKitRow:
    """One shard row decoded; position p is the teacher's distribution over token p + 1."""

    file: str
    row: int
    input_ids: np.ndarray  # [L] int64
    ids: np.ndarray  # [P, k] int64
    logprobs: np.ndarray  # [P, k] float32, T = 1, over the whole vocabulary (not renormalised)
    attention_mask: np.ndarray | None = None  # packed datasets: segment number per token


def source_files(uri: str) -> list[str]:
    """The folder's ``data_<i>.parquet`` shards in the order of i (``data_10`` after ``data_9``)."""
    if not fs.exists(uri):
        raise DistillKitError(f"{uri} does not exist")
    shards = sorted((int(m.group(1)), name) for name in fs.listdir(uri) if (m := _SHARD.fullmatch(name)))
    if not shards:
        raise DistillKitError(f"{uri} holds no data_<i>.parquet shard (the file names DistillKit's capture writes)")
    return [fs.join(uri, name) for _, name in shards]


def _columns(schema: Any, file: str) -> list[str]:
    names = set(schema.names)
    if _LEGACY_COLUMNS & names and "compressed_logprobs" not in names:
        raise DistillKitError(f"{file}: {_LEGACY}")
    missing = [c for c in _COLUMNS if c not in names]
    if missing:
        raise DistillKitError(f"{file}: no column {', '.join(missing)} (found {', '.join(schema.names)})")
    return list(_COLUMNS) + (["attention_mask"] if "attention_mask" in names else [])


def _position_bytes(cell: Any, width: int, where: str, name: str) -> np.ndarray:
    """A ``list<list<uint8>>`` cell as uint8 ``[P, width]``; a position of another length is refused."""
    import pyarrow.compute as pc

    if not cell.is_valid:
        raise DistillKitError(f"{where}: {name} is null")
    positions = cell.values
    lengths = pc.list_value_length(positions).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(lengths != width)
    if len(bad):
        p = int(bad[0])
        raise DistillKitError(
            f"{where}: {name} at position {p} has {lengths[p]} bytes, expected {width} for this config "
            f"({len(bad)} such positions)"
        )
    flat = positions.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.uint8).reshape(len(positions), width)


def _ints(cell: Any, where: str, name: str) -> np.ndarray:
    if not cell.is_valid:
        raise DistillKitError(f"{where}: {name} is null")
    return np.asarray(cell.values.to_numpy(zero_copy_only=False), dtype=np.int64)


def _row(batch: Any, i: int, file: str, row: int, config: DistillKitConfig) -> DistillKitRow:
    where = f"{file} row {row}"
    lp = _position_bytes(batch.column("compressed_logprobs")[i], config.logprob_bytes(), where, "compressed_logprobs")
    ix = _position_bytes(batch.column("bytepacked_indices")[i], config.index_bytes(), where, "bytepacked_indices")
    if len(lp) != len(ix):
        raise DistillKitError(
            f"{where}: {len(lp)} positions of compressed_logprobs but {len(ix)} of bytepacked_indices"
        )
    ids, logprobs = decode_positions(lp, ix, config)
    mask = None
    if "attention_mask" in batch.schema.names:
        mask = _ints(batch.column("attention_mask")[i], where, "attention_mask")
    return DistillKitRow(file, row, _ints(batch.column("input_ids")[i], where, "input_ids"), ids, logprobs, mask)


def _file_rows(file: str, config: DistillKitConfig, batch_rows: int) -> Iterator[DistillKitRow]:
    import pyarrow.parquet as pq

    fsys, path = fs.filesystem(file)
    with fsys.open(path, "rb") as handle:
        shard = pq.ParquetFile(handle)
        columns = _columns(shard.schema_arrow, file)
        row = 0
        for batch in shard.iter_batches(batch_size=batch_rows, columns=columns):
            for i in range(batch.num_rows):
                yield _row(batch, i, file, row, config)
                row += 1


def read_rows(uri: str, config: DistillKitConfig, batch_rows: int = 64) -> Iterator[DistillKitRow]:
    """Every row of every shard, decoded one whole row (all its positions) at a time; Parquet is
    read ``batch_rows`` rows at a time (rows of 8k positions x k bytes are large)."""
    for file in source_files(uri):
        yield from _file_rows(file, config, batch_rows)
