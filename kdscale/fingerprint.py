"""Content fingerprints: the keys that tie a student back to the exact teacher, tokenizer and data.

Teacher and tokenizer fingerprints are hashes of *content*, never of paths or timestamps, so the
same teacher weights copied to another bucket still produce the same ``cache_id`` (levanter's
ledger idea). The corpus is the exception: to name a cache before a billion-token corpus is read,
its part is the input units' descriptors (paths relative to the corpus folder, ranges, sizes,
mtimes or etags; :func:`kdscale.data.units.dataset_identity`), and the content hashes computed as
units are read are recorded and checked on resume instead.
``cache_id`` is 32 hex characters (128 bits) because MLflow rejects dataset digests longer than 36.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

CACHE_ID_HEX = 32


def digest(obj: Any, hex_chars: int = 64) -> str:
    """Stable hash of a JSON-able object (keys sorted, no whitespace)."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.blake2b(data, digest_size=hex_chars // 2).hexdigest()


def cache_id(teacher_fp: str, tokenizer_fp: str, dataset_fp: str, targets: dict[str, Any], format_version: int) -> str:
    return digest(
        {
            "teacher": teacher_fp,
            "tokenizer": tokenizer_fp,
            "dataset": dataset_fp,
            "targets": targets,
            "format_version": format_version,
        },
        CACHE_ID_HEX,
    )


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what decides token ids: vocabulary, merges, normalizer, pre-tokenizer, added tokens.

    Settings that do not change ids (padding, truncation) are left out so two copies of one
    tokenizer configured differently still match. An image task stands in for the tokenizer
    and fingerprints its own label names and input encoding."""
    if hasattr(tokenizer, "fingerprint"):
        return tokenizer.fingerprint()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"kdscale needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    kept = {k: spec.get(k) for k in ("model", "normalizer", "pre_tokenizer", "added_tokens")}
    return digest(kept)


def tensors_fingerprint(state_dict: dict[str, Any]) -> str:
    """Hash of a model's tensors (names, shapes, dtypes and bytes) for teachers built in memory."""
    import torch

    h = hashlib.blake2b(digest_size=32)
    for name in sorted(state_dict):
        t = state_dict[name].detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
