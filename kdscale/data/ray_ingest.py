"""Parallel corpus tokenization on Ray Data (the thin Ray side of :mod:`kdscale.data.corpus`).

One dataset row per corpus file; ``map_batches`` reads and tokenizes files on the cluster (any
fsspec URI: each task reads its own files), and the stream comes back *in corpus order*
(``preserve_order``), so packing — sequential, cheap, in the driver — produces exactly the rows,
seq_ids and content hash of the single-process path. Iteration stops as soon as ``max_tokens`` is
packed; Ray Data then stops reading.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray

from kdscale.config import CorpusSpec
from kdscale.data.corpus import CorpusError, corpus_files, tokenize_file
from kdscale.errors import find_in_chain

FILES_PER_TASK = 4


def _tokenize_batch(batch: dict[str, Any], fmt: str, field: str, tokenizer) -> dict[str, Any]:
    uris, ids = [], []
    for uri in batch["uri"]:
        for doc in tokenize_file(str(uri), fmt, field, tokenizer):
            uris.append(str(uri))
            ids.append(doc)
    return {"uri": np.asarray(uris, dtype=object), "ids": np.asarray(ids + [None], dtype=object)[:-1]}


def ray_token_stream(spec: CorpusSpec, tokenizer) -> Iterator[tuple[str, np.ndarray]]:
    """(file uri, document token ids) in corpus order, tokenized by Ray Data tasks."""
    files = corpus_files(spec)
    if not files:
        return
    items = ray.data.from_items([{"uri": f} for f in files], override_num_blocks=max(1, len(files) // FILES_PER_TASK))
    items.context.execution_options.preserve_order = True
    ds = items.map_batches(
        _tokenize_batch,  # type: ignore[arg-type]  # fn_kwargs fill the extra parameters
        batch_size=FILES_PER_TASK,
        batch_format="numpy",
        fn_kwargs={"fmt": spec.format, "field": spec.field, "tokenizer": tokenizer},
    )
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for uri, ids in zip(batch["uri"], batch["ids"]):
                yield str(uri), np.asarray(ids, dtype=np.int32)
    except Exception as e:  # a bad file's CorpusError arrives wrapped in Ray's task errors
        cause = find_in_chain(e, ("CorpusError",))
        message = str(cause) if cause is not None else _corpus_error_text(e)
        if message is None:
            raise
        raise CorpusError(message) from None


def _corpus_error_text(error: BaseException) -> str | None:
    """Ray Data keeps only the *text* of a UDF's exception (a UserCodeException with the remote
    traceback); the CorpusError's message is its last ``CorpusError:`` line."""
    found = re.findall(r"CorpusError: (.+)", str(error))
    return found[-1].strip() if found else None
