"""Other tools' top-k rows as kdscale cache rows: one alignment rule, one windowing rule, one
tail-mass rule for every source format (DistillKit, vLLM / axolotl).

Alignment. kdscale's targets at position p describe the token *after* input_ids[p]. A source
row gives ``positions`` P distributions for L input ids, position p predicting token p+1:
P = L - 1 for capture output (vLLM has no distribution for token 0), P = L for packed datasets
(DistillKit's ``pack_logits`` truncates input_ids to the positions). The kdscale row's tokens are
input_ids[:P]. P > L, or P < L - 1, cannot be aligned and is refused, naming the row.

Packed rows (an ``attention_mask`` of segment numbers 1, 2, ...; 0 = padding) are split into
their segments first: each segment's distributions were computed on that segment alone, so a
kdscale row never spans two of them.

Windows. kdscale rows have one length (``seq_len``); a sequence of P positions gives
floor(P / seq_len) rows of consecutive positions, and the rest (P mod seq_len) is dropped and
counted (``dropped_positions``, like the packing tails of a precompute). Rows after a
sequence's first were computed by the teacher with the earlier windows as context, which the
student does not see; the first window of every sequence is context-exact (``first_windows``).

Tail mass = 1 - sum(exp(logprobs)), clamped at 0; where the decoded mass exceeds 1 (DistillKit's
recommended config reaches 1.07 on SmolLM2) the clamp is counted, never hidden.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from kdscale.data.corpus import seq_id, split_of

MASS_TOLERANCE = 1e-4  # float32 sums of exact log-probs reach 1 + ~1e-6; a real excess is far larger


class SourceError(ValueError):
    """A source that cannot be imported; the message names the file and row."""


@dataclass
class SourceRow:
    file: str
    row: int
    input_ids: np.ndarray  # [L]
    ids: np.ndarray  # [P, k] int64
    logprobs: np.ndarray  # [P, k] float32, T = 1, normalised over the whole vocabulary
    attention_mask: np.ndarray | None = None  # packed rows: segment number per token (0: padding)


@dataclass
class Sequence:
    """Tokens and their next-token distributions (position p predicts tokens[p + 1])."""

    tokens: np.ndarray  # [P]
    ids: np.ndarray  # [P, k]
    logprobs: np.ndarray  # [P, k]


def sequences(row: SourceRow) -> list[Sequence]:
    """The row aligned (see the module docstring), split into its packed segments."""
    length, positions = len(row.input_ids), row.ids.shape[0]
    where = f"{row.file} row {row.row}"
    if positions > length:
        raise SourceError(f"{where}: {positions} positions for {length} tokens (at most one per token)")
    if positions < length - 1:
        raise SourceError(f"{where}: {positions} positions for {length} tokens (capture output has {length - 1})")
    tokens = np.asarray(row.input_ids[:positions], dtype=np.int64)
    whole = Sequence(tokens, row.ids, row.logprobs)
    if row.attention_mask is None:
        return [whole]
    mask = np.asarray(row.attention_mask[:positions])
    if len(mask) != positions:
        raise SourceError(f"{where}: attention_mask has {len(row.attention_mask)} values for {length} tokens")
    if mask.max(initial=0) <= 1:  # a plain 0/1 mask: one segment, padding dropped
        keep = mask > 0
        return [Sequence(tokens[keep], row.ids[keep], row.logprobs[keep])]
    out = []
    for segment in np.unique(mask[mask > 0]):
        at = mask == segment
        out.append(Sequence(tokens[at], row.ids[at], row.logprobs[at]))
    return out


@dataclass
class Window:
    tokens: np.ndarray  # [seq_len] int32
    ids: np.ndarray  # [seq_len, k] int32
    logprobs: np.ndarray  # [seq_len, k] float32
    first: bool  # the sequence's first window: the teacher saw exactly this context


def windows(seq: Sequence, seq_len: int) -> Iterator[Window]:
    for i, start in enumerate(range(0, len(seq.tokens) - seq_len + 1, seq_len)):
        stop = start + seq_len
        yield Window(
            seq.tokens[start:stop].astype(np.int32),
            seq.ids[start:stop].astype(np.int32),
            seq.logprobs[start:stop].astype(np.float32),
            i == 0,
        )


def tail_mass(logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tail mass clamped at 0, decoded mass) per position."""
    mass = np.exp(logprobs.astype(np.float64)).sum(axis=-1)
    return np.clip(1.0 - mass, 0.0, None).astype(np.float32), mass


def teacher_nll(w: Window, tail: np.ndarray, vocab_size: int) -> float:
    """The teacher's summed NLL of the window's next tokens from its stored targets alone: exact
    where the next token is among the k ids, else its share of the tail mass spread uniformly
    over the ids not stored (an estimate; deterministic, so a re-import gives the same rows)."""
    labels = w.tokens[1:]
    ids, logprobs = w.ids[:-1], w.logprobs[:-1]
    hit = ids == labels[:, None]
    found = hit.any(axis=1)
    exact = np.where(hit, logprobs, 0.0).sum(axis=1)
    spread = max(vocab_size - ids.shape[1], 1)
    estimate = np.log(np.maximum(tail[:-1].astype(np.float64), 1e-12) / spread)
    return float(-np.where(found, exact, estimate).sum())


def cache_row(w: Window, vocab_size: int, fractions: tuple[float, float]) -> tuple[str, dict, np.ndarray]:
    """The split (by content hash, as a precompute's rows), the kdscale ``topk`` row of a window,
    and its decoded mass per position."""
    sid = seq_id(w.tokens)
    split = split_of(sid, *fractions)
    tail, mass = tail_mass(w.logprobs)
    row = {
        "seq_id": sid,
        "input_ids": w.tokens,
        "teacher_nll": teacher_nll(w, tail, vocab_size),
        "target_ids": w.ids.reshape(-1),
        "target_logprobs": w.logprobs.reshape(-1),
        "tail_mass": tail,
    }
    if split != "train":
        row["teacher_top1"] = w.ids[np.arange(len(w.ids)), w.logprobs.argmax(axis=1)].astype(np.int32)
    return split, row, mass


@dataclass
class Quality:
    """What the import found in the source's values (reported, never hidden)."""

    positions: int = 0
    mass_sum: float = 0.0
    over_one: int = 0  # positions whose decoded mass exceeds 1 (tail clamped to 0)
    max_mass: float = 0.0
    positive_logprobs: int = 0  # stored values > 0 (a probability above 1)
    labels_in_topk: int = 0
    labelled: int = 0
    first_windows: int = 0
    windows: int = 0
    dropped_positions: int = 0
    sequences: int = 0
    source_rows: int = 0
    extra: dict = field(default_factory=dict)

    def add(self, w: Window, mass: np.ndarray) -> None:
        self.positions += len(mass)
        self.mass_sum += float(mass.sum())
        self.over_one += int((mass > 1 + MASS_TOLERANCE).sum())
        self.max_mass = max(self.max_mass, float(mass.max(initial=0.0)))
        self.positive_logprobs += int((w.logprobs > 0).sum())
        self.labels_in_topk += int((w.ids[:-1] == w.tokens[1:, None]).any(axis=1).sum())
        self.labelled += len(w.tokens) - 1
        self.windows += 1
        self.first_windows += int(w.first)

    def summary(self) -> dict:
        n = max(self.positions, 1)
        return {
            "source_rows": self.source_rows,
            "sequences": self.sequences,
            "rows": self.windows,
            "context_exact_rows": self.first_windows,
            "positions": self.positions,
            "dropped_positions": self.dropped_positions,
            "mean_mass": round(self.mass_sum / n, 6),
            "max_mass": round(self.max_mass, 6),
            "positions_mass_over_1": self.over_one,
            "positive_logprobs": self.positive_logprobs,
            "next_token_in_topk": round(self.labels_in_topk / max(self.labelled, 1), 6),
            **self.extra,
        }


def check_values(row: SourceRow, vocab_size: int) -> None:
    """Ids inside the tokenizer's vocabulary and finite log-probs, or a refusal naming the row."""
    where = f"{row.file} row {row.row}"
    for name, ids in (("input_ids", row.input_ids), ("target ids", row.ids)):
        if ids.size and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
            bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
            raise SourceError(f"{where}: {name} hold {bad}, outside the tokenizer's vocabulary of {vocab_size}")
    if row.logprobs.size and not np.isfinite(row.logprobs).all():
        p = int(np.flatnonzero(~np.isfinite(row.logprobs).all(axis=-1))[0])
        raise SourceError(f"{where}: position {p} has a non-finite log-prob")
