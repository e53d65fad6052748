"""kdscale.interop.distillkit: DistillKit's compressed top-k cache decoded as DistillKit decodes it,
checked against what DistillKit's own decompressor returned for each fixture (reference.npz); the
byte arithmetic, the bit unpacker and the refusals on their own."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from kdscale.interop import distillkit as dk

FIXTURES = Path(os.environ.get("KDSCALE_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
DISTILLKIT = FIXTURES / "distillkit"
FOLDERS = sorted(p.name for p in DISTILLKIT.iterdir() if (p / "reference.npz").is_file()) if DISTILLKIT.is_dir() else []
needs_fixtures = pytest.mark.skipif(not FOLDERS, reason=f"no DistillKit fixtures at {DISTILLKIT}")

RECOMMENDED = {  # DistillKit README "recommended" configuration
    "d": 49152,
    "k": 128,
    "exact_k": 16,
    "exact_dtype": "bfloat16",
    "polynomial_terms": [0, 1, 2, 3, 4, "sqrt"],
    "residual_bins": [],
    "delta_encoding": False,
}
BUDGET = {**RECOMMENDED, "k": 50, "exact_k": 1, "polynomial_terms": [0, 1, "sqrt"]}
PUBLISHED_QWEN3 = {
    "d": 151936,
    "k": 128,
    "exact_k": 32,
    "exact_dtype": "float32",
    "polynomial_terms": [0, 1, 2],
    "residual_bins": [],
}
RESIDUAL_BINS = {
    "d": 49152,
    "k": 64,
    "exact_k": 8,
    "exact_dtype": "float16",
    "polynomial_terms": [0, 1, 2, "sqrt", "exp"],
    "term_dtype": "bfloat16",
    "residual_bins": [
        {"element_bits": 8, "num_elements": 16, "scale_dtype": "float16"},
        {"element_bits": 3, "num_elements": 20, "scale_dtype": "float32"},
        {"element_bits": 1, "num_elements": 5, "scale_dtype": "bfloat16"},
    ],
    "delta_encoding": False,
    "error_diffusion": True,
    "normalize_t": True,
}


def _reference(ref, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, ids, logprobs) of one row; ragged fixtures keep one key per row (``ids_0``)."""
    if "ids" in ref:
        return ref["input_ids"][row], ref["ids"][row], ref["logprobs"][row]
    return ref[f"input_ids_{row}"], ref[f"ids_{row}"], ref[f"logprobs_{row}"]


def _rows_in(ref) -> int:
    return len(ref["ids"]) if "ids" in ref else sum(1 for key in ref.files if key.startswith("ids_"))


def _canonical(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each position sorted by (log-prob descending, id): tied log-probs may come in any id order."""
    order = np.lexsort((ids, -logprobs), axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(logprobs, order, -1)


@needs_fixtures
@pytest.mark.parametrize("folder", FOLDERS)
def test_every_row_decodes_like_distillkit(folder):
    uri = str(DISTILLKIT / folder)
    config = dk.load_config(uri)
    ref = np.load(DISTILLKIT / folder / "reference.npz")
    rows = list(dk.read_rows(uri, config))
    assert [r.row for r in rows] == list(range(_rows_in(ref)))
    worst = 0.0
    for r in rows:
        input_ids, ids, logprobs = _reference(ref, r.row)
        assert r.input_ids.dtype == np.int64 and np.array_equal(r.input_ids, input_ids.astype(np.int64))
        assert r.ids.dtype == np.int64 and r.logprobs.dtype == np.float32
        assert r.ids.shape == ids.shape == (len(input_ids) - 1, config.k)
        mine, theirs = _canonical(r.ids, r.logprobs), _canonical(ids, logprobs)
        assert np.array_equal(mine[0], theirs[0]), f"{folder} row {r.row}: ids differ"
        worst = max(worst, float(np.abs(mine[1] - theirs[1]).max(initial=0.0)))
        assert r.attention_mask is None
    assert worst <= 1e-3, f"{folder}: max |Δ logprob| {worst}"


@needs_fixtures
@pytest.mark.parametrize("folder", FOLDERS)
def test_fixture_sizes_match_the_bytes_on_disk(folder):
    """bytes_per_position() agrees with every stored position (and with DistillKit's total_bits)."""
    config = dk.load_config(str(DISTILLKIT / folder))
    table = pq.read_table(DISTILLKIT / folder / "data_0.parquet")
    for column, width in (
        ("compressed_logprobs", config.logprob_bytes()),
        ("bytepacked_indices", config.index_bytes()),
    ):
        lengths = pa.compute.list_value_length(table.column(column).combine_chunks().flatten())
        assert set(lengths.to_pylist()) == {width}


@pytest.mark.parametrize(
    ("config", "logprob_bytes", "index_bytes"),
    [(RECOMMENDED, 56, 256), (BUDGET, 14, 100), (PUBLISHED_QWEN3, 140, 288), (RESIDUAL_BINS, 59, 128)],
)
def test_bytes_per_position_as_distillkit_counts_them(config, logprob_bytes, index_bytes):
    cfg = dk.DistillKitConfig.model_validate(config)
    assert (cfg.logprob_bytes(), cfg.index_bytes()) == (logprob_bytes, index_bytes)
    assert cfg.bytes_per_position() == logprob_bytes + index_bytes  # 312, 114, 428, 187


@pytest.mark.parametrize(("d", "bits"), [(49152, 16), (49153, 16), (151936, 18), (65536, 16), (65537, 17), (2, 1)])
def test_index_bits_exact_and_equal_to_distillkit(d, bits):
    cfg = dk.DistillKitConfig.model_validate({**RECOMMENDED, "d": d})
    assert cfg.index_bits() == bits == dk._distillkit_index_bits(d)


def test_d_where_distillkits_float32_log2_is_a_bit_short_is_refused():
    with pytest.raises(dk.DistillKitError, match=r"d: d=2097153 needs 22-bit ids but DistillKit packs 21"):
        dk.parse_config({**RECOMMENDED, "d": 2**21 + 1}, "cfg.yaml")


def _pack(values: list[int], bits: int) -> np.ndarray:
    stream = "".join(format(v, f"0{bits}b") for v in values)
    stream += "0" * (-len(stream) % 8)
    return np.array([int(stream[i : i + 8], 2) for i in range(0, len(stream), 8)], dtype=np.uint8)


@pytest.mark.parametrize("bits", [1, 3, 8, 16, 18, 33, 63])
def test_unpack_bits_reads_msb_first_streams_row_by_row(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 2**bits, size=(3, 7), dtype=np.uint64).astype(np.int64)
    data = np.stack([_pack(row.tolist(), bits) for row in values])
    assert np.array_equal(dk.unpack_bits(data, bits, 7), values)
    assert dk.unpack_bits(data[None], bits, 7).shape == (1, 3, 7)


def test_unpack_bits_64_bit_values_wrap_like_torch_int64():
    data = _pack([2**64 - 1, 5], 64)
    assert dk.unpack_bits(data, 64, 2).tolist() == [-1, 5]


def test_truncated_bit_stream_is_refused():
    with pytest.raises(dk.DistillKitError, match="truncated bit stream: 36 bits needed, 32 present"):
        dk.unpack_bits(np.zeros((2, 4), dtype=np.uint8), 18, 2)


def test_decode_positions_refuses_a_wrong_width():
    cfg = dk.DistillKitConfig.model_validate(BUDGET)
    with pytest.raises(dk.DistillKitError, match="bytepacked_indices: expected 100 bytes per position.*found 99"):
        dk.decode_positions(np.zeros((2, 14), np.uint8), np.zeros((2, 99), np.uint8), cfg)
    with pytest.raises(dk.DistillKitError, match="compressed_logprobs: expected 14 bytes.*found 15"):
        dk.decode_positions(np.zeros((2, 15), np.uint8), np.zeros((2, 100), np.uint8), cfg)


def test_missing_config_names_the_path(tmp_path):
    with pytest.raises(dk.DistillKitError) as caught:
        dk.load_config(str(tmp_path))
    message = str(caught.value)
    assert str(tmp_path / "compression_config.yaml") in message and "beside" in message


def test_invalid_config_lists_every_problem_by_field(tmp_path):
    bad = {**RECOMMENDED, "exact_k": 200, "term_dtype": "float8", "residual_bins": [{"scale_dtype": "float16"}]}
    (tmp_path / "compression_config.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(dk.DistillKitError) as caught:
        dk.load_config(str(tmp_path))
    message = str(caught.value)
    assert "exact_k: exact_k (200) must be <= k (128)" in message
    assert "term_dtype:" in message
    assert "residual_bins.0.element_bits:" in message and "residual_bins.0.num_elements:" in message


def test_distillkits_own_config_checks():
    for change, problem in [
        ({"polynomial_terms": None}, "needs polynomial_terms or residual_bins"),
        ({"residual_bins": [{"scale_dtype": "float16", "element_bits": 4, "num_elements": 113}]}, "sum to 113"),
        ({"residual_bins": [{"scale_dtype": "float16", "element_bits": 65, "num_elements": 4}]}, "element_bits"),
        ({"unknown": 1}, "unknown"),
    ]:
        with pytest.raises(dk.DistillKitError, match=problem):
            dk.parse_config({**RECOMMENDED, **change}, "cfg.yaml")


def _shard(tmp_path: Path, rows: list[dict], name: str = "data_0.parquet", config: dict = BUDGET) -> Path:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "compression_config.yaml").write_text(yaml.safe_dump(config))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / name)
    return tmp_path


def _budget_row(positions: int) -> dict:
    return {
        "input_ids": list(range(positions + 1)),
        "compressed_logprobs": [[0] * 14] * positions,
        "bytepacked_indices": [[0] * 100] * positions,
    }


def test_rows_with_bad_positions_are_refused_naming_file_and_row(tmp_path):
    cut = _budget_row(3)
    cut["bytepacked_indices"] = [[0] * 100, [0] * 40, [0] * 100]
    folder = _shard(tmp_path / "cut", [_budget_row(3), cut])
    with pytest.raises(dk.DistillKitError, match=r"data_0.parquet row 1: bytepacked_indices at position 1 has 40"):
        list(dk.read_rows(str(folder), dk.load_config(str(folder))))
    uneven = {**_budget_row(3), "bytepacked_indices": [[0] * 100] * 2}
    folder = _shard(tmp_path / "uneven", [uneven])
    with pytest.raises(dk.DistillKitError, match=r"data_0.parquet row 0: 3 positions .* but 2"):
        list(dk.read_rows(str(folder), dk.load_config(str(folder))))


def test_shards_in_numeric_order_and_attention_mask_kept(tmp_path):
    row = {**_budget_row(2), "attention_mask": [1, 1, 2]}
    for i in (10, 2):
        _shard(tmp_path, [row], f"data_{i}.parquet")
    (tmp_path / "notes.parquet").write_text("not a shard")
    files = dk.source_files(str(tmp_path))
    assert [Path(f).name for f in files] == ["data_2.parquet", "data_10.parquet"]
    rows = list(dk.read_rows(str(tmp_path), dk.load_config(str(tmp_path))))
    assert [(Path(r.file).name, r.row) for r in rows] == [("data_2.parquet", 0), ("data_10.parquet", 0)]
    assert rows[0].attention_mask.tolist() == [1, 1, 2] and rows[0].ids.shape == (2, 50)


def test_legacy_schema_and_config_are_refused(tmp_path):
    legacy = {"input_ids": [1, 2], "packed_indices": [[1]], "exact_values": [[0.0]], "coeffs": [[0.0]]}
    folder = _shard(tmp_path, [legacy])
    with pytest.raises(dk.DistillKitError, match="legacy DistillKit schema .* not supported"):
        list(dk.read_rows(str(folder), dk.load_config(str(folder))))
    old = {"k": 128, "exact_k": 16, "polynomial_degree": 4, "vocab_size": 49152}
    with pytest.raises(dk.DistillKitError, match="legacy DistillKit schema"):
        dk.parse_config(old, "cfg.yaml")


def test_a_folder_without_shards_is_refused(tmp_path):
    with pytest.raises(dk.DistillKitError, match="no data_<i>.parquet"):
        dk.source_files(str(tmp_path))
