"""Tokenizer alignment by byte ends (kdscale.data.alignment): the bytes of every token id of the
byte-level and SentencePiece-style vocabularies, refusals of the others, and rows re-tokenized by
a student's tokenizer with each position aligned to the teacher's that ends at the same byte.
Tokenizers are built here from hand-made vocabularies (golden ids) or trained on the tiny corpus;
no network, no Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kdscale.data.alignment import (
    AlignedRow,
    AlignmentUnsupported,
    TokenBytes,
    align_row,
    aligned_fraction,
    exact_matches,
    exact_token_bytes,
    teacher_label_bytes,
    token_bytes,
)
from tests.conftest import JOBS

TINY = JOBS / "assets" / "tiny-tokenizer"
CORPUS = sorted((JOBS / "assets" / "tiny-corpus").glob("*.rst"))
EOT = "<|endoftext|>"
SP_SPECIALS = ("<unk>", "<s>", "</s>")


# Tokenizers -------------------------------------------------------------------------------------


def _byte_chars(text: str) -> str:
    """``text`` in GPT-2's byte alphabet, as tokenizers' own ByteLevel writes it."""
    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    return "".join(p for p, _ in pieces)


def _prefix_merges(vocab: dict[str, int], words) -> list[tuple[str, str]]:
    """Merges (and vocabulary entries) that build each word left to right, one symbol at a time."""
    merges = []
    for w in words:
        for k in range(2, len(w) + 1):
            if w[:k] not in vocab:
                merges.append((w[: k - 1], w[k - 1]))
                vocab[w[:k]] = len(vocab)
    return merges


def _byte_level(words=()) -> PreTrainedTokenizerFast:
    """A byte-level BPE: id 0 end-of-text, ids 1..256 the byte alphabet (sorted), then one token
    per prefix of each of ``words`` (so each word is one token; without words: one per byte)."""
    vocab = {EOT: 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = _prefix_merges(vocab, [_byte_chars(w) for w in words])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOT, special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT)


def _sentencepiece(legacy: bool = False) -> PreTrainedTokenizerFast:
    """A Llama-2-style BPE: <unk> <s> </s>, the 256 byte-fallback tokens <0x00>..<0xFF> (ids
    3..258), then '▁' 'h' 'i' 't' 'e' 'r' (259..264), '▁h' '▁hi' (265, 266), '▁t' .. '▁there'
    (267..271). ``legacy``: the dummy prefix and '▁' come from the normalizer (Llama-2's
    tokenizer.json), else from a Metaspace pre-tokenizer."""
    vocab = {s: i for i, s in enumerate(SP_SPECIALS)}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    words = ["▁hi", "▁there"]
    for ch in "".join(words):
        vocab.setdefault(ch, len(vocab))
    merges = _prefix_merges(vocab, words)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens([AddedToken(s, special=True) for s in SP_SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _trained(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the tiny corpus (as kdscale.data.bpe trains students')."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([p.read_text() for p in CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT)


@pytest.fixture(scope="module")
def tiny():
    tok = AutoTokenizer.from_pretrained(str(TINY))
    return tok, token_bytes(tok)


@pytest.fixture(scope="module")
def words():
    tok = _byte_level(["distillation", " is", " fun"])
    return tok, token_bytes(tok)


@pytest.fixture(scope="module")
def chars():
    tok = _byte_level()
    return tok, token_bytes(tok)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


# Token bytes ------------------------------------------------------------------------------------

TEXTS = [
    "café déjà vu",
    "日本語のテキスト",
    "emoji 😀👍🏽 and tabs\tand\nnewlines",
    "  spaces   inside ",
    "<|endoftext|> as text",
]


def test_tiny_tokenizer_bytes_round_trip(tiny):
    """Every id of the repo's 512-token byte-level BPE has its bytes: the specials none, the
    others at least one; any text's ids spell exactly its UTF-8 bytes."""
    tok, tb = tiny
    assert len(tb) == len(tok) == 512
    assert tb.pieces[:2] == (b"", b"") and tb.pieces[2] == b"!"
    assert (tb.lengths()[2:] >= 1).all()
    for text in TEXTS + [p.read_text() for p in CORPUS[:2]]:
        ids = _ids(tok, text)
        assert b"".join(tb.pieces[i] for i in ids) == text.encode()
        assert tb.row_bytes(ids) == text.encode()
        assert tb.ends(ids)[-1] == len(text.encode())
    assert tb.row_bytes([0, 1]) == b""  # end-of-text and padding stand for no text


def test_raw_tokenizers_object_is_accepted(tiny):
    raw = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    assert token_bytes(raw) == tiny[1]
    ids = raw.encode("café", add_special_tokens=False).ids
    row = align_row(ids, tiny[1], raw, tiny[1], 16)
    assert row.student_ids.tolist() == ids and row.teacher_pos.tolist() == list(range(len(ids)))


def test_hand_made_byte_level_vocabulary(words):
    tok, tb = words
    assert len(tb) == 273
    assert tb.pieces[0] == b"" and tb.pieces[267] == b"distillation"
    assert tb.pieces[269] == b" is" and tb.pieces[272] == b" fun"
    assert _ids(tok, "distillation is fun") == [267, 269, 272]
    assert sorted(tb.pieces[1:257]) == [bytes([b]) for b in range(256)]  # each byte once


@pytest.mark.parametrize("legacy", [False, True])
def test_sentencepiece_pieces(legacy):
    """'▁' is a space, '<0xNN>' the byte NN, the control tokens nothing."""
    tb = token_bytes(_sentencepiece(legacy))
    assert len(tb) == 272
    assert tb.pieces[:3] == (b"", b"", b"")
    assert tb.pieces[3] == b"\x00" and tb.pieces[3 + 0xC3] == b"\xc3" and tb.pieces[258] == b"\xff"
    assert tb.pieces[259:267] == (b" ", b"h", b"i", b"t", b"e", b"r", b" h", b" hi")
    assert tb.pieces[271] == b" there"


def test_non_special_added_tokens_stand_for_their_text(chars):
    tok = _byte_level()
    tok.add_tokens([AddedToken(" foo bar", special=False)])
    tok.add_special_tokens({"additional_special_tokens": ["<ctrl>"]})
    tb = token_bytes(tok)
    assert len(tb) == 259 and tb.pieces[257:] == (b" foo bar", b"")
    ids = _ids(tok, "x foo bar y")
    assert 257 in ids and tb.row_bytes(ids) == b"x foo bar y"
    row = align_row(ids, tb, chars[0], chars[1], 32)
    assert ids == [88, 257, 221, 89]  # "x", " foo bar", " ", "y"
    assert row.teacher_pos.tolist() == [0, -1, -1, -1, -1, -1, -1, -1, 1, 2, 3] and not row.inexact


def _wordpiece() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece({"[UNK]": 0, "dis": 1, "##till": 2, "##ation": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _whitespace_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _suffix_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(vocab={"a": 0, "b</w>": 1}, merges=[], end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _off_alphabet_byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(vocab={"a": 0, "a b": 1}, merges=[]))  # a literal space: not GPT-2's 'Ġ'
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (_wordpiece, "neither byte-level BPE nor SentencePiece-style"),
        (_whitespace_bpe, "neither byte-level BPE nor SentencePiece-style"),
        (_suffix_bpe, "end_of_word_suffix"),
        (_off_alphabet_byte_level, "outside the byte-level alphabet"),
    ],
)
def test_unsupported_tokenizers(make, why):
    tok = make()
    with pytest.raises(AlignmentUnsupported, match=why):
        token_bytes(tok)
    assert exact_token_bytes(tok) is None


def test_slow_tokenizers_are_refused():
    class Slow:
        name_or_path = "slow-one"

        def __call__(self, text, **kwargs):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")

    with pytest.raises(AlignmentUnsupported, match="slow-one is not a fast"):
        token_bytes(Slow())
    teacher = TokenBytes((b"a",))
    with pytest.raises(AlignmentUnsupported, match="needs offsets"):
        align_row([0], teacher, Slow(), None, 8)


# TokenBytes as stored ---------------------------------------------------------------------------


def test_arrow_round_trip_and_digest():
    tb = TokenBytes((b"", b"a", b"bc", b"\xff\x00"))
    table = tb.to_arrow()
    assert table.schema.field("id").type == pa.int32() and table.schema.field("bytes").type == pa.binary()
    assert table.column("id").to_pylist() == [0, 1, 2, 3]
    back = TokenBytes.from_arrow(table)
    assert back == tb and back.digest() == tb.digest()
    assert TokenBytes((b"", b"a", b"bc")).digest() == "dc4d9042623f1e76ffc2626902e59354a7b935747ca1d5fe7d077f4763f58ac8"
    assert TokenBytes((b"a", b"bc")).digest() != TokenBytes((b"ab", b"c")).digest()
    assert TokenBytes((b"a", b"bc")).digest() != TokenBytes((b"a", b"bd")).digest()
    assert TokenBytes((b"a",)).digest() != TokenBytes((b"a", b"")).digest()
    with pytest.raises(ValueError, match="0..n-1"):
        TokenBytes.from_arrow(table.take([1, 0, 2, 3]))
    with pytest.raises(ValueError, match="lacks"):
        TokenBytes.from_arrow(table.drop_columns(["bytes"]))


def test_lengths_ends_and_label_bytes():
    tb = TokenBytes([b"", b"ab", b"c", "é".encode()])  # a list is kept as a tuple
    assert isinstance(tb.pieces, tuple) and len(tb) == 4
    assert tb.lengths().tolist() == [0, 2, 1, 2] and tb.lengths().dtype == np.int64
    assert tb.lengths() is tb.lengths() and not tb.lengths().flags.writeable
    ids = np.array([1, 0, 3, 2])
    assert tb.row_bytes(ids) == "abéc".encode()
    assert tb.ends(ids).tolist() == [2, 2, 4, 5] and tb.ends([]).tolist() == []
    assert teacher_label_bytes(ids, tb) == 3 and teacher_label_bytes([2], tb) == 0


def test_exact_matches_one_to_one():
    teacher = TokenBytes((b"", b"a", b"a", b"b", b"c", b"d"))
    student = TokenBytes((b"b", b"a", b"", b"a", b"a", b"d", b"d"))
    t, s = exact_matches(teacher, student)
    assert t.dtype == s.dtype == np.int64
    assert t.tolist() == [1, 3, 5] and s.tolist() == [1, 0, 5]
    t, s = exact_matches(TokenBytes((b"",)), TokenBytes((b"",)))
    assert t.tolist() == [] and s.tolist() == []


def test_exact_matches_of_real_vocabularies(tiny, chars):
    """Each of the 256 single bytes is an id on both sides, and nothing else is."""
    t, s = exact_matches(tiny[1], chars[1])
    assert len(t) == 256 and len(set(s.tolist())) == 256
    assert all(tiny[1].pieces[i] == chars[1].pieces[j] for i, j in zip(t.tolist(), s.tolist()))
    assert (np.diff(t) > 0).all()


# Rows -------------------------------------------------------------------------------------------


def test_word_teacher_char_student(words, chars):
    """'distillation' is one teacher token and twelve student ones: only the student's last
    byte of each teacher token is aligned."""
    row = align_row([267, 269, 272], words[1], chars[0], chars[1], 64)
    assert row.student_ids.tolist() == [ord(c) - 32 for c in "distillation"] + [221, 73, 83, 221, 70, 85, 78]
    assert chars[1].row_bytes(row.student_ids) == b"distillation is fun"
    expected = np.full(19, -1)
    expected[[11, 14, 18]] = [0, 1, 2]
    assert row.teacher_pos.tolist() == expected.tolist()
    assert (row.length, row.truncated, row.label_bytes, row.inexact) == (19, False, 18, False)


def test_char_teacher_word_student(words, chars):
    ids = _ids(chars[0], "distillation is fun")
    row = align_row(ids, chars[1], words[0], words[1], 64)
    assert row.student_ids.tolist() == [267, 269, 272]
    assert row.teacher_pos.tolist() == [11, 14, 18]
    assert row.label_bytes == 7 == teacher_label_bytes([267, 269, 272], words[1])
    assert not row.inexact and not row.truncated


def test_truncated_to_student_len(words, chars):
    row = align_row([267, 269, 272], words[1], chars[0], chars[1], 5)
    assert row.student_ids.tolist() == [68, 73, 83, 84, 73]
    assert row.teacher_pos.tolist() == [-1] * 5
    assert (row.length, row.truncated, row.label_bytes) == (5, True, 4)
    empty = align_row([267], words[1], chars[0], chars[1], 0)
    assert (empty.length, empty.truncated, empty.label_bytes) == (0, True, 0)
    assert empty.student_ids.dtype == empty.teacher_pos.dtype == np.int64


def test_row_cut_inside_characters(tiny, chars):
    """A row that starts after the first byte of '日' and ends before the last of '😀': the
    partial characters are left out, the rest aligned exactly (the byte-level student splits
    '本' and '語' into bytes just as the teacher does)."""
    tok, tb = tiny
    ids = _ids(tok, "日本語 distillation 😀")
    assert tb.ends(ids).tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 15, 17, 18, 22, 23, 24, 25, 26, 27]
    cut = ids[1:-1]
    assert tb.row_bytes(cut)[:2] == b"\x97\xa5" and tb.row_bytes(cut)[-3:] == b"\xf0\x9f\x98"
    row = align_row(cut, tb, chars[0], chars[1], 64)
    assert chars[1].row_bytes(row.student_ids) == "本語 distillation ".encode()
    assert row.teacher_pos.tolist() == [2, 3, 4, 5, 6, 7, -1, 8, -1, 9, -1, 10, -1, 11, 12, -1, -1, -1, 13, 14]
    assert (row.label_bytes, row.inexact) == (19, False)


def test_invalid_bytes_inside_a_row(tiny, chars):
    """b'a\\xffb': decoded with a replacement character, aligned through offsets (inexact), still
    in the teacher's byte positions: '\\ufffd' stands for the one byte it replaced."""
    tok, tb = tiny
    ids = tok.convert_tokens_to_ids(["a", "ÿ", "b"])
    assert tb.row_bytes(ids) == b"a\xffb"
    row = align_row(ids, tb, chars[0], chars[1], 64)
    assert chars[1].row_bytes(row.student_ids) == "a\ufffdb".encode()
    assert row.teacher_pos.tolist() == [0, -1, -1, 1, 2]
    assert (row.label_bytes, row.inexact) == (2, True)


def test_special_token_strings_in_text_stay_text(tiny, chars):
    """'<|endoftext|>' spelled by ordinary teacher tokens is text for the student too."""
    tok, tb = tiny
    ids = _ids(tok, "a<|endoftext|>b")
    assert 0 not in ids
    row = align_row(ids, tb, chars[0], chars[1], 64)
    assert 0 not in row.student_ids.tolist() and not row.inexact
    assert chars[1].row_bytes(row.student_ids) == b"a<|endoftext|>b"
    assert row.teacher_pos.tolist() == [0, 1, 2, -1, 3, 4, 5, 6, -1, -1, -1, 7, 8, 9, 10]


def test_empty_teacher_tokens_align_to_the_last(words, chars):
    """An end shared by several teacher positions (an empty special token after 'distillation')
    goes to the last: the token after it starts the text at that byte."""
    row = align_row([267, 0, 269], words[1], chars[0], chars[1], 64)
    assert row.teacher_pos[11] == 1 and row.teacher_pos[14] == 2


def test_sentencepiece_student_dummy_prefix_is_exact(tiny):
    """The student's '▁hi' stands for ' hi' but the text has no leading space: still exact, the
    extra space is taken off its byte ends. Byte-fallback tokens align byte by byte."""
    tok, tb = tiny
    ids = _ids(tok, "hi é there")
    assert tok.convert_ids_to_tokens(ids) == ["hi", "Ġ", "Ã", "©", "Ġthe", "re"]
    for legacy in (False, True):
        sp = _sentencepiece(legacy)
        row = align_row(ids, tb, sp, token_bytes(sp), 20)
        assert row.student_ids.tolist() == [266, 259, 3 + 0xC3, 3 + 0xA9, 271]
        assert row.teacher_pos.tolist() == [0, 1, 2, 3, 5]
        assert (row.label_bytes, row.inexact) == (9, False)


def test_legacy_sentencepiece_leading_space():
    """Llama-2's normalizer prefixes '▁' even to a text that starts with a space: the lone '▁'
    then covers no text (end 0) and the rest is exact."""
    sp = _sentencepiece(legacy=True)
    tb = token_bytes(sp)
    row = align_row([266], tb, sp, tb, 8)  # ' hi'
    assert row.student_ids.tolist() == [259, 266] and row.teacher_pos.tolist() == [-1, 0]
    assert not row.inexact


def test_offsets_fallback_without_student_bytes(tiny):
    """Without the student's bytes, ends come from offsets (inexact): the two byte-fallback tokens
    of 'é' share one offset, so only the second is aligned."""
    tok, tb = tiny
    row = align_row(_ids(tok, "hi é there"), tb, _sentencepiece(), None, 20)
    assert row.teacher_pos.tolist() == [0, 1, -1, 3, 5]
    assert (row.label_bytes, row.inexact) == (9, True)


def test_cut_inside_a_run_of_equal_offsets(tiny):
    """Cut after the first byte-fallback token of 'é': it still ends inside the character."""
    tok, tb = tiny
    row = align_row(_ids(tok, "hi é there"), tb, _sentencepiece(), None, 3)
    assert row.teacher_pos.tolist() == [0, 1, -1] and row.truncated


def test_trained_tokenizers_align_every_common_boundary(tiny):
    """Teacher and student byte-level BPEs trained on the same corpus with different vocabularies:
    on rows cut at arbitrary tokens, every byte end both share is aligned, and nothing else."""
    tok, tb = tiny
    student = _trained(300)
    sb = token_bytes(student)
    stream = np.asarray(_ids(tok, CORPUS[0].read_text()[:3000] + " 日本語 é 😀 " * 3), dtype=np.int64)
    rows = []
    for start in range(0, len(stream) - 64, 97):
        teacher_ids = stream[start : start + 64]
        row = align_row(teacher_ids, tb, student, sb, 256)
        assert not row.inexact and not row.truncated
        ends_t, ends_s = tb.ends(teacher_ids), sb.ends(row.student_ids)
        s0 = len(tb.row_bytes(teacher_ids)) - len(tb.row_bytes(teacher_ids).lstrip(bytes(range(0x80, 0xC0))))
        common = set(ends_t.tolist()) & set((ends_s + s0).tolist())
        aligned = row.teacher_pos >= 0
        assert (ends_t[row.teacher_pos[aligned]] == ends_s[aligned] + s0).all()
        assert int(aligned.sum()) == len(common)
        rows.append(row)
    fraction = aligned_fraction(rows)
    assert 0.3 < fraction < 1.0


def test_aligned_fraction():
    def row(pos: list[int]) -> AlignedRow:
        return AlignedRow(np.zeros(len(pos), np.int64), np.array(pos, np.int64), len(pos), False, 0, False)

    assert aligned_fraction([row([0, -1, 2]), row([-1])]) == pytest.approx(0.5)
    assert aligned_fraction([]) == 0.0 and aligned_fraction([row([])]) == 0.0
