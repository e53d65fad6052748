"""A GGUF teacher's tokenizer and config, converted once per file into plain Hugging Face files.

transformers derives both from the GGUF file's metadata by parsing all of it in Python, once for
the tokenizer and once for the config: 7.3 s of the quickstart's 12-s dry run on this machine
(SmolLM2-135M: 4.1 s tokenizer, 3.1 s config, 2026-12-07), paid again by every command that
prepares the job. The converted files (``tokenizer.json``, ``config.json``, …) load in 0.13 s.

They are kept under ``$KDSCALE_HOME/gguf/<key>`` (:mod:`kdscale.user_cache`), keyed by the
file's version (real path, size, modification and change times, inode) and by the transformers
and tokenizers versions that converted it, so an edited or replaced file, or another
transformers, converts afresh. A folder appears whole or not at all (written beside, then
renamed), so two processes converting at once both end with a complete one. The round trip
changes no token id: the backend tokenizer's JSON and the config come back equal
(tests/test_gguf_metadata.py), so caches keep their cache_id.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from kdscale import fs
from kdscale.fingerprint import digest
from kdscale.user_cache import file_version, home

# bump when what is written changes, so older conversions are not read as current ones
CONVERSION_VERSION = 1


def conversion_key(path: str) -> str:
    import tokenizers
    import transformers

    return digest(
        {
            "file": file_version(path),
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "version": CONVERSION_VERSION,
        },
        32,
    )


def converted_folder(folder: str, gguf_file: str, trust_remote_code: bool = False) -> str | None:
    """A local folder holding the tokenizer and config of ``folder``/``gguf_file``, converted now
    if no earlier call did. None where conversion cannot help or be kept (a remote file, which
    transformers cannot read as GGUF anyway; a home folder that cannot be written): the caller
    then reads the GGUF file itself, as before."""
    path = os.path.join(folder, gguf_file)
    if fs.is_remote(path) or not os.path.isfile(path):
        return None
    target = os.path.join(home(), "gguf", conversion_key(path))
    if os.path.isdir(target):
        return target
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=".converting-", dir=os.path.dirname(target))
    except OSError:
        return None
    try:
        _convert(folder, gguf_file, trust_remote_code, scratch)
        os.rename(scratch, target)
    except OSError:  # another process renamed its copy first: use that one
        if not os.path.isdir(target):
            raise
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(scratch)
    return target


def _convert(folder: str, gguf_file: str, trust_remote_code: bool, into: str) -> None:
    from transformers import AutoConfig, AutoTokenizer

    kwargs = {"gguf_file": gguf_file, "trust_remote_code": trust_remote_code}
    AutoTokenizer.from_pretrained(folder, **kwargs).save_pretrained(into)
    AutoConfig.from_pretrained(folder, **kwargs).save_pretrained(into)
