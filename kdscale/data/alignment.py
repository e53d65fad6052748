"""Aligning a student with its own tokenizer to a cache made with the teacher's, by byte ends.

A cache row holds the teacher's token ids, and position j holds the teacher's distribution over
token j + 1. Two tokenizers cut the same text at different places, so a student cannot read the
teacher's positions one to one. What both agree on is the text: with the bytes each teacher id
stands for (:class:`TokenBytes`, stored once per cache), a row's text and each teacher token's
byte end are known exactly. The student re-tokenizes that text, and its position i is aligned to
the teacher position j whose token ends at the same byte: after both, the text that starts at that
byte is what they predict, so the teacher's distribution there is a target for the student's.
Student positions inside a teacher token have no such target and get the hard-label loss only.

This is the alignment of the Universal Logit Distillation loss (Boizard et al. 2024, "Towards
Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs") and of TRL's GOLD
trainer, done on exact bytes instead of decoded strings, so it is right on multi-byte characters,
byte-fallback tokens and rows cut in the middle of a character. :func:`exact_matches` pairs the
ids whose bytes are equal on both sides (the hybrid loss's direct term).

Bytes are recovered exactly for byte-level BPE vocabularies (GPT-2's byte-to-unicode alphabet)
and SentencePiece-style ones ('▁' for a space, '<0xNN>' byte-fallback tokens); other tokenizers
raise :class:`AlignmentUnsupported`. Pure: numpy, pyarrow and hashlib; tokenizers are passed in.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa


class AlignmentUnsupported(ValueError):
    """A tokenizer whose tokens' bytes cannot be recovered exactly, or that gives no offsets."""


# Tokenizer vocabularies -------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: each byte as a printable character (printable Latin-1 bytes stand for
    themselves, the other 68 for U+0100 onwards, in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


_BYTE_TO_CHAR = _bytes_to_unicode()
_TO_LATIN1 = {ord(c): b for b, c in _BYTE_TO_CHAR.items()}  # str.translate: alphabet char -> chr(byte)
_FROM_LATIN1 = {b: c for b, c in _BYTE_TO_CHAR.items()}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPACE = "\u2581"  # SentencePiece's '▁'


@dataclass(frozen=True)
class TokenBytes:
    """The bytes each token id stands for inside a text (special/added control tokens: b'')."""

    pieces: tuple[bytes, ...]
    _lengths: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pieces = tuple(bytes(p) for p in self.pieces)
        lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
        lengths.flags.writeable = False
        object.__setattr__(self, "pieces", pieces)
        object.__setattr__(self, "_lengths", lengths)

    def __len__(self) -> int:
        return len(self.pieces)

    def lengths(self) -> np.ndarray:
        """int64 [vocab]: each id's byte length (read-only, computed once)."""
        return self._lengths

    def row_bytes(self, ids: Any) -> bytes:
        """The text ``ids`` stand for."""
        return b"".join(map(self.pieces.__getitem__, np.asarray(ids, dtype=np.int64).reshape(-1).tolist()))

    def ends(self, ids: Any) -> np.ndarray:
        """int64: each token's end in ``row_bytes(ids)`` (non-decreasing; equal after an empty piece)."""
        return np.cumsum(self._lengths[np.asarray(ids, dtype=np.int64).reshape(-1)], dtype=np.int64)

    def to_arrow(self) -> pa.Table:
        return pa.table(
            {
                "id": pa.array(np.arange(len(self.pieces), dtype=np.int32), type=pa.int32()),
                "bytes": pa.array(self.pieces, type=pa.binary()),
            }
        )

    @classmethod
    def from_arrow(cls, table: pa.Table) -> TokenBytes:
        """The table :meth:`to_arrow` makes; ValueError unless its ids are 0..n-1 in order."""
        missing = {"id", "bytes"} - set(table.column_names)
        if missing:
            raise ValueError(f"token bytes table lacks column(s) {sorted(missing)}")
        ids = table.column("id").to_numpy(zero_copy_only=False)
        if not np.array_equal(ids, np.arange(len(ids))):
            raise ValueError("token bytes table: ids are not 0..n-1 in order")
        pieces = table.column("bytes").to_pylist()
        if any(p is None for p in pieces):
            raise ValueError("token bytes table: null bytes")
        return cls(tuple(pieces))

    def digest(self) -> str:
        """sha256 over the pieces, each prefixed with its length (so no two vocabularies collide
        by moving bytes between neighbours)."""
        h = hashlib.sha256()
        for p in self.pieces:
            h.update(len(p).to_bytes(8, "little"))
            h.update(p)
        return h.hexdigest()


def token_bytes(tokenizer: Any) -> TokenBytes:
    """The bytes of every id of a fast tokenizer (transformers, or a ``tokenizers.Tokenizer``),
    over ``len(tokenizer)`` ids; AlignmentUnsupported where they cannot be recovered exactly."""
    backend = _backend(tokenizer)
    spec = json.loads(backend.to_str())
    style = _style(spec, _name(tokenizer))
    size = len(tokenizer) if backend is not tokenizer else backend.get_vocab_size(with_added_tokens=True)
    strings: list[str | None] = [None] * size
    for tok, i in backend.get_vocab(with_added_tokens=True).items():
        if 0 <= i < size:
            strings[i] = tok
    added = backend.get_added_tokens_decoder()
    special = set(getattr(tokenizer, "all_special_ids", None) or []) | {i for i, t in added.items() if t.special}
    pieces = []
    for i, tok in enumerate(strings):
        if tok is None or i in special:
            pieces.append(b"")
        elif i in added:
            pieces.append(_added_piece(added[i], style))
        else:
            pieces.append(_piece(tok, style, i, tokenizer))
    return TokenBytes(tuple(pieces))


def exact_token_bytes(tokenizer: Any) -> TokenBytes | None:
    """:func:`token_bytes`, or None where the tokenizer's bytes cannot be recovered exactly."""
    try:
        return token_bytes(tokenizer)
    except AlignmentUnsupported:
        return None


def _name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _is_backend(tokenizer: Any) -> bool:
    """A ``tokenizers.Tokenizer`` (told apart by its methods, so tokenizers need not be imported)."""
    return hasattr(tokenizer, "to_str") and hasattr(tokenizer, "get_added_tokens_decoder")


def _backend(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind a transformers tokenizer (or the tokenizer itself)."""
    if _is_backend(tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise AlignmentUnsupported(
            f"tokenizer {_name(tokenizer)} is not a fast (tokenizers) tokenizer; its tokens' bytes cannot be "
            "recovered exactly (load it with use_fast=True, from a tokenizer.json)"
        )
    return backend


def _components(node: dict | None) -> Iterator[dict]:
    """A normalizer, pre-tokenizer or decoder and, for a Sequence, everything inside it."""
    if not node:
        return
    yield node
    for key in ("normalizers", "pretokenizers", "decoders"):
        for child in node.get(key) or []:
            yield from _components(child)


def _replaces(node: dict | None, pattern: str, content: str) -> bool:
    return any(
        c.get("type") == "Replace" and (c.get("pattern") or {}).get("String") == pattern and c.get("content") == content
        for c in _components(node)
    )


def _style(spec: dict, name: str) -> str:
    """'byte_level' or 'sentencepiece', from the tokenizer.json; AlignmentUnsupported otherwise."""
    model = spec.get("model") or {}
    kind = model.get("type")
    if kind == "BPE" and (model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")):
        raise AlignmentUnsupported(
            f"tokenizer {name} marks word pieces (BPE continuing_subword_prefix/end_of_word_suffix); its tokens' "
            "bytes cannot be recovered exactly"
        )
    parts = [*_components(spec.get("pre_tokenizer")), *_components(spec.get("decoder"))]
    types = {c.get("type") for c in parts}
    if kind in ("BPE", "Unigram", "WordLevel") and "ByteLevel" in types:
        return "byte_level"
    metaspace = (
        "Metaspace" in types
        or _replaces(spec.get("decoder"), _SPACE, " ")
        or _replaces(spec.get("normalizer"), " ", _SPACE)
    )
    if kind in ("BPE", "Unigram") and metaspace:
        return "sentencepiece"
    what = f"a {kind} model" if kind else "an unknown model"
    raise AlignmentUnsupported(
        f"tokenizer {name} ({what}) is neither byte-level BPE nor SentencePiece-style; its tokens' bytes cannot be "
        "recovered exactly"
    )


def _added_piece(token: Any, style: str) -> bytes:
    """A non-special added token: its text as written, matched in the raw text (or, ``normalized``
    in a SentencePiece-style tokenizer, in the text with spaces as '▁')."""
    content = str(token.content)
    if style == "sentencepiece" and token.normalized:
        content = content.replace(_SPACE, " ")
    return content.encode("utf-8")


def _piece(tok: str, style: str, i: int, tokenizer: Any) -> bytes:
    if style == "sentencepiece":
        fallback = _BYTE_FALLBACK.fullmatch(tok)
        return bytes([int(fallback.group(1), 16)]) if fallback else tok.replace(_SPACE, " ").encode("utf-8")
    latin1 = tok.translate(_TO_LATIN1)
    try:
        data = latin1.encode("latin-1")
    except UnicodeEncodeError:
        data = None
    if data is None or latin1.translate(_FROM_LATIN1) != tok:
        raise AlignmentUnsupported(
            f"tokenizer {_name(tokenizer)}: token {tok!r} (id {i}) is outside the byte-level alphabet; its bytes "
            "cannot be recovered exactly"
        )
    return data


# Rows -------------------------------------------------------------------------------------------


@dataclass
class AlignedRow:
    """One teacher row as the student's: its tokens and, per position, the teacher position whose
    token ends at the same byte (-1: none)."""

    student_ids: np.ndarray  # int64 [length] (not padded), at most student_len
    teacher_pos: np.ndarray  # int64 [length]
    length: int
    truncated: bool  # the re-tokenized text had more than student_len tokens (cut)
    label_bytes: int  # bytes the student's labels (tokens 1..length-1) cover
    inexact: bool  # the student's byte ends come from its offsets, not from exact token bytes


def align_row(
    teacher_ids: Any, teacher: TokenBytes, student_tokenizer: Any, student: TokenBytes | None, student_len: int
) -> AlignedRow:
    """The teacher row ``teacher_ids`` re-tokenized by ``student_tokenizer`` (with the bytes of its
    vocabulary, ``student``, where known) and cut to ``student_len`` tokens.

    Bytes before the row's first whole character and after its last are left out (a row can be cut
    inside a multi-byte character). Where several positions on a side share a byte end, the last
    is the one aligned: the token after it is the one that starts the text at that byte (before
    it, on the teacher's side, come empty special tokens; on the student's, with offsets, the
    other byte-fallback or byte-level tokens of the same character, which end inside it).
    """
    data = teacher.row_bytes(teacher_ids)
    ends_t = teacher.ends(teacher_ids)
    s0, s1 = _whole_characters(data)
    body = data[s0:s1]
    text, char_bytes = _decode(body)
    ids, offsets = _encode(student_tokenizer, text)
    ends_s, inexact = _student_ends(ids, offsets, body, text, char_bytes, student)
    inexact = inexact or char_bytes is not None
    ends_s = ends_s + s0
    teacher_pos = _match(ends_s, ends_t)  # before the cut: a run of equal ends may cross it
    truncated = len(ids) > student_len
    length = min(len(ids), max(student_len, 0))
    ids, ends_s = ids[:length], ends_s[:length]
    return AlignedRow(
        student_ids=ids,
        teacher_pos=teacher_pos[:length],
        length=length,
        truncated=truncated,
        label_bytes=int(ends_s[-1] - ends_s[0]) if length >= 2 else 0,
        inexact=inexact,
    )


def _whole_characters(data: bytes) -> tuple[int, int]:
    """[start, end) of ``data`` without leading UTF-8 continuation bytes (at most 3) and without
    a trailing incomplete multi-byte sequence."""
    start = 0
    while start < min(3, len(data)) and data[start] & 0xC0 == 0x80:
        start += 1
    end = len(data)
    for back in range(1, min(4, end - start) + 1):
        lead = data[end - back]
        if lead & 0xC0 == 0x80:
            continue
        if _sequence_length(lead) > back:
            end -= back
        break
    return start, end


def _sequence_length(lead: int) -> int:
    """The bytes a UTF-8 sequence starting with ``lead`` has (1 for an invalid lead byte)."""
    if lead >> 5 == 0b110:
        return 2
    if lead >> 4 == 0b1110:
        return 3
    if lead >> 3 == 0b11110:
        return 4
    return 1


def _utf8_lengths(text: str) -> np.ndarray:
    """int64 [len(text)]: each character's UTF-8 length."""
    code = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return 1 + (code >= 0x80).astype(np.int64) + (code >= 0x800) + (code >= 0x10000)


def _decode(body: bytes) -> tuple[str, np.ndarray | None]:
    """The text, and None when it is valid UTF-8; else each character's source byte count (an
    invalid sequence becomes one U+FFFD standing for its bytes)."""
    try:
        return body.decode("utf-8"), None
    except UnicodeDecodeError:
        pass
    parts: list[str] = []
    sizes: list[np.ndarray] = []
    pos = 0
    while pos < len(body):
        try:
            rest = body[pos:].decode("utf-8")
        except UnicodeDecodeError as e:
            good = body[pos : pos + e.start].decode("utf-8")
            parts += [good, "\ufffd"]
            sizes += [_utf8_lengths(good), np.array([e.end - e.start], dtype=np.int64)]
            pos += e.end
            continue
        parts.append(rest)
        sizes.append(_utf8_lengths(rest))
        break
    return "".join(parts), np.concatenate(sizes)


def _encode(tokenizer: Any, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [n], char offsets int64 [n, 2]) of ``text``, without special tokens added, and
    with special tokens' strings in the text read as text (transformers tokenizers)."""
    if _is_backend(tokenizer):  # special tokens' strings in the text are matched as such here
        enc = tokenizer.encode(text, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets
    else:
        try:
            out = tokenizer(
                text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True, verbose=False
            )
        except NotImplementedError as e:
            raise AlignmentUnsupported(
                f"tokenizer {_name(tokenizer)} gives no offsets mapping (a slow tokenizer?); aligning a student "
                "to the teacher needs offsets: use a fast tokenizer (tokenizer.json)"
            ) from e
        ids, offsets = out["input_ids"], out["offset_mapping"]
    return np.asarray(ids, dtype=np.int64).reshape(-1), np.asarray(offsets, dtype=np.int64).reshape(-1, 2)


def _student_ends(
    ids: np.ndarray,
    offsets: np.ndarray,
    body: bytes,
    text: str,
    char_bytes: np.ndarray | None,
    student: TokenBytes | None,
) -> tuple[np.ndarray, bool]:
    """(each student token's byte end in ``body``, inexact): exact where the student's token bytes
    spell ``body``, else from the offsets mapping."""
    exact = _exact_ends(ids, body, student)
    if exact is not None:
        return exact, False
    return _offset_ends(offsets, text, char_bytes), True


def _exact_ends(ids: np.ndarray, body: bytes, student: TokenBytes | None) -> np.ndarray | None:
    """The ends from the student's token bytes, where they spell ``body``, or a space and ``body``
    (a SentencePiece dummy prefix, or add_prefix_space: the space is then no text's); else None."""
    if student is None or (len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= len(student))):
        return None
    spelled = student.row_bytes(ids)
    if spelled == body:
        return student.ends(ids)
    if spelled == b" " + body:
        return np.maximum(student.ends(ids) - 1, 0)
    return None


def _offset_ends(offsets: np.ndarray, text: str, char_bytes: np.ndarray | None) -> np.ndarray:
    """Byte ends from the offsets' character ends (made non-decreasing)."""
    if not len(offsets):
        return np.zeros(0, dtype=np.int64)
    sizes = _utf8_lengths(text) if char_bytes is None else char_bytes
    prefix = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(sizes, dtype=np.int64)])
    return np.maximum.accumulate(prefix[np.clip(offsets[:, 1], 0, len(text))])


def _match(ends_s: np.ndarray, ends_t: np.ndarray) -> np.ndarray:
    """For each student end, the last teacher position with that end (-1: none); of student
    positions sharing an end, only the last is aligned."""
    pos = np.full(len(ends_s), -1, dtype=np.int64)
    if not len(ends_s) or not len(ends_t):
        return pos
    j = np.searchsorted(ends_t, ends_s, side="right") - 1
    last = np.ones(len(ends_s), dtype=bool)
    last[:-1] = ends_s[1:] != ends_s[:-1]
    ok = (j >= 0) & (ends_t[np.maximum(j, 0)] == ends_s) & last
    pos[ok] = j[ok]
    return pos


# Vocabularies and rows, summed up ---------------------------------------------------------------


def teacher_label_bytes(teacher_ids: Any, teacher: TokenBytes) -> int:
    """Bytes the teacher's labels (tokens 1..n-1 of the row) cover."""
    ids = np.asarray(teacher_ids, dtype=np.int64).reshape(-1)
    return int(teacher.lengths()[ids[1:]].sum())


def exact_matches(teacher: TokenBytes, student: TokenBytes) -> tuple[np.ndarray, np.ndarray]:
    """(teacher ids, student ids), int64, sorted by teacher id: the ids whose non-empty bytes are
    equal, one to one (where several ids on a side share bytes, the lowest of each is paired)."""
    lowest_student: dict[bytes, int] = {}
    for i, p in enumerate(student.pieces):
        if p:
            lowest_student.setdefault(p, i)
    pairs: list[tuple[int, int]] = []
    for i, p in enumerate(teacher.pieces):
        s = lowest_student.pop(p, None) if p else None
        if s is not None:
            pairs.append((i, s))
    out = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return out[:, 0].copy(), out[:, 1].copy()


def aligned_fraction(rows: Iterable[AlignedRow]) -> float:
    """Aligned student positions over all student positions (0.0 for none)."""
    aligned = positions = 0
    for r in rows:
        aligned += int((r.teacher_pos[: r.length] >= 0).sum())
        positions += r.length
    return aligned / positions if positions else 0.0
