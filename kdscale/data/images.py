"""Image classification data from IDX files (the format MNIST and Fashion-MNIST ship in).

An IDX file is a big-endian header — two zero bytes, a type code (0x08: uint8), the number of
dimensions — then one uint32 per dimension and the raw values; ``.gz`` files are decompressed.
Each image with its label becomes one cache row, keyed by a hash of its pixels and label, so the
held-out split (when no separate test files are given), sampling seeds and resume depend on
content, exactly as for token sequences.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from dataclasses import dataclass, field

import numpy as np

from kdscale import fs
from kdscale.config import CorpusSpec
from kdscale.data.corpus import corpus_files, split_hash, split_of

UINT8 = 0x08


class IdxError(ValueError):
    """A file that is not an IDX array of the expected shape."""


def _open(uri: str, limit: int | None = None) -> bytes:
    fsys, path = fs.filesystem(uri)
    with fsys.open(path, "rb") as raw:
        if uri.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw) as f:
                return f.read(limit) if limit else f.read()
        return raw.read(limit) if limit else raw.read()


def _header(data: bytes, uri: str) -> tuple[int, ...]:
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IdxError(f"{uri}: not an IDX file (bad magic)")
    if data[2] != UINT8:
        raise IdxError(f"{uri}: IDX type 0x{data[2]:02x} is not uint8 (0x08)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise IdxError(f"{uri}: truncated IDX header")
    return struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])


def read_idx(uri: str) -> np.ndarray:
    """The uint8 array stored in an IDX file (any fsspec URI, gzipped or not)."""
    data = _open(uri)
    dims = _header(data, uri)
    start = 4 + 4 * len(dims)
    expected = int(np.prod(dims))
    if len(data) - start != expected:
        raise IdxError(f"{uri}: {len(data) - start} values after the header, its dimensions {dims} need {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(dims)


def image_shape(uri: str) -> tuple[int, int]:
    """(height, width) of the images in an IDX file, from its header alone."""
    dims = _header(_open(uri, 16), uri)
    if len(dims) != 3:
        raise IdxError(f"{uri}: an image file has 3 dimensions (count, height, width), this one {len(dims)}")
    return dims[1], dims[2]


def example_id(pixels: np.ndarray, label: int) -> str:
    """16 hex chars of blake2b over the image bytes and its label."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    h.update(int(label).to_bytes(4, "little"))
    return h.hexdigest()


@dataclass
class ImageCorpus:
    """Images (flattened uint8) and labels per split; one position (one prediction) per row."""

    train: list[tuple[np.ndarray, int]] = field(default_factory=list)
    heldout: list[tuple[np.ndarray, int]] = field(default_factory=list)
    validation: list[tuple[np.ndarray, int]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    height: int = 0
    width: int = 0
    seq_len: int = 1

    @property
    def splits(self) -> dict[str, list[tuple[np.ndarray, int]]]:
        return {"train": self.train, "heldout": self.heldout, "validation": self.validation}

    @property
    def documents(self) -> int:
        return sum(len(rows) for rows in self.splits.values())

    @property
    def tokens(self) -> int:
        return self.documents  # one predicted position per image

    def content_hash(self) -> str:
        return split_hash(f"images={self.height}x{self.width}", self.splits, lambda row: example_id(*row))

    def all_labels(self) -> np.ndarray:
        return np.asarray([label for rows in self.splits.values() for _, label in rows], dtype=np.int64)


def _pairs(images: list[str], labels: list[str]) -> tuple[list[tuple[np.ndarray, int]], tuple[int, int]]:
    """(flattened pixels, label) of every image in the paired files, and the first file's
    image height and width ((0, 0) without files)."""
    out, shape = [], None
    for img_uri, lab_uri in zip(images, labels):
        x, y = read_idx(img_uri), read_idx(lab_uri)
        if x.ndim != 3 or y.ndim != 1:
            raise IdxError(
                f"{img_uri} / {lab_uri}: expected images [n, h, w] and labels [n], got {x.shape} / {y.shape}"
            )
        if len(x) != len(y):
            raise IdxError(f"{img_uri} has {len(x)} images but {lab_uri} has {len(y)} labels")
        shape = shape or (x.shape[1], x.shape[2])
        out += [(x[i].reshape(-1), int(y[i])) for i in range(len(x))]
    return out, shape or (0, 0)


def _expand(patterns: list[str] | None) -> list[str]:
    return [u for p in patterns or [] for u in fs.expand(p)]


def load_images(spec: CorpusSpec) -> ImageCorpus:
    """Read the spec's IDX image/label files. With ``heldout_paths`` those files are the held-out
        split (e.g. an official test set); otherwise rows are split by content hash, as is the
    validation split (``validation_fraction`` of ``paths``) in both cases. ``max_tokens``
        caps the training images (one position each); ``eval.max_heldout_rows`` caps evaluation."""
    train_images, heldout_images = corpus_files(spec), _expand(spec.heldout_paths)
    train, (height, width) = _pairs(train_images, _expand(spec.labels))
    corpus = ImageCorpus(sources=train_images + heldout_images, height=height, width=width)
    # with an official test set nothing of `paths` is held out; validation is cut from it either way
    heldout_fraction = 0.0 if heldout_images else spec.heldout_fraction
    if heldout_images:
        corpus.heldout, _ = _pairs(heldout_images, _expand(spec.heldout_labels))
    for x, y in train:
        corpus.splits[split_of(example_id(x, y), heldout_fraction, spec.validation_fraction)].append((x, y))
    if spec.max_tokens:
        corpus.train = corpus.train[: spec.max_tokens]
    return corpus
