"""What kdscale refuses in a model folder before loading anything, teacher or student: custom
code it would have to run, pickle-only weights (unpickling runs code), truncated or corrupt
weight files (headers only: a bad file must fail before any work, not minutes into loading on
every actor)."""

from __future__ import annotations

import json
import struct

from kdscale import fs

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
PICKLE_SUFFIXES = (".bin", ".pt")


def code_problems(folder: str | None, trust_remote_code: bool) -> list[str]:
    """A model folder whose config asks for custom Python code (``auto_map``) would fail inside
    transformers with a prompt-like error, or, trusted, run that code: say so before any work."""
    if folder is None or trust_remote_code or not fs.exists(fs.join(folder, "config.json")):
        return []
    try:
        config = fs.read_json(fs.join(folder, "config.json"))
    except ValueError as e:
        return [f"unreadable config.json in {folder}: {e}"]
    if isinstance(config, dict) and config.get("auto_map"):
        return [
            f"{folder} needs custom model code (config.json auto_map: {sorted(config['auto_map'])}); kdscale "
            "does not run code from model folders unless trust_remote_code: true"
        ]
    return []


def pickle_only_problem(folder: str, files: list[str]) -> list[str]:
    if not files or not all(f.endswith(PICKLE_SUFFIXES) for f in files):
        return []
    names = ", ".join(sorted(f.rsplit("/", 1)[-1] for f in files))
    return [
        f"{folder} holds only pickle weights ({names}); "
        "kdscale never unpickles model files (they can run code): convert them to safetensors "
        "(model.save_pretrained(folder, safe_serialization=True) in a process you trust)"
    ]


def corruption_problems(files: list[str]) -> list[str]:
    problems = []
    for uri in files:
        try:
            if uri.endswith(".safetensors"):
                check_safetensors(uri)
            elif uri.endswith(".gguf"):
                check_gguf(uri)
        except (ValueError, OSError) as e:  # GGUFError is a ValueError
            problems.append(f"corrupt weights file {uri}: {e}")
    return problems


def check_safetensors(uri: str) -> None:
    size = fs.size(uri)
    fsys, path = fs.filesystem(uri)
    with fsys.open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError("header length runs past the end of the file")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"unreadable safetensors header ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"truncated: tensors need {8 + n + end} bytes, the file has {size}")


def check_gguf(uri: str) -> None:
    from kdscale.models.gguf_check import check_gguf as check

    size = fs.size(uri)
    fsys, path = fs.filesystem(uri)
    with fsys.open(path, "rb", block_size=1 << 20) as f:
        check(f, size)
