"""Teacher loading (Hugging Face folder, GGUF file, or a seeded random model for tests).

Kept free of Ray so the same code runs in a precompute actor, a benchmark's bare loop, or a test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kdscale import fs
from kdscale.config import TeacherSpec, resolve_package_path
from kdscale.fingerprint import digest, tensors_fingerprint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
# Config fields that describe how a checkpoint was stored, not the architecture a student inherits.
NON_ARCH_FIELDS = (
    "quantization_config",
    "_name_or_path",
    "architectures",
    "transformers_version",
    "dtype",
    "torch_dtype",
)


def teacher_folder(spec: TeacherSpec) -> str | None:
    if spec.path is None:
        return None
    return resolve_package_path(spec.path) if spec.path.startswith("pkg:") else spec.path


def _load_kwargs(spec: TeacherSpec) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    return kwargs


def load_tokenizer(spec: TeacherSpec):
    """The teacher's tokenizer: every student shares it, and the cache records its fingerprint."""
    from transformers import AutoTokenizer

    if spec.tokenizer:
        folder = resolve_package_path(spec.tokenizer) if spec.tokenizer.startswith("pkg:") else spec.tokenizer
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=spec.trust_remote_code)
    return AutoTokenizer.from_pretrained(teacher_folder(spec), **_load_kwargs(spec))


def random_teacher_config(spec: TeacherSpec, vocab_size: int | None, task: str = "causal_lm"):
    """A random teacher's config: a llama over the tokenizer's vocabulary, or (images) the
    architecture as given, a ResNet unless ``model_type`` says otherwise."""
    from transformers import AutoConfig

    arch = dict(spec.architecture or {})
    model_type = arch.pop("model_type", "llama" if task == "causal_lm" else "resnet")
    unknown = unknown_fields(model_type, arch)
    if unknown:
        raise ValueError(f"unknown {model_type} config field(s): {', '.join(unknown)}")
    if task == "causal_lm":
        arch.setdefault("vocab_size", vocab_size)
    try:
        config = AutoConfig.for_model(model_type, **arch)
    except Exception as e:  # transformers' own validation (not always a ValueError)
        raise ValueError(str(e).strip().splitlines()[-1].strip().removeprefix("ValueError: ")) from None
    problems = shape_problems(config)
    if problems:
        raise ValueError("; ".join(problems))
    return config


def unknown_fields(model_type: str, fields: dict[str, Any]) -> list[str]:
    """Fields a transformers config of ``model_type`` does not have (it would accept and ignore
    them, hiding a typo like ``hiden_size``)."""
    from transformers import AutoConfig

    try:
        known = set(AutoConfig.for_model(model_type).to_dict()) | {"num_labels"}  # num_labels: sets id2label
    except ValueError as e:  # transformers names the model types it knows
        raise ValueError(f"unknown model_type {model_type!r} ({str(e)[:120]})") from None
    return sorted(k for k in fields if k not in known)


def shape_problems(config) -> list[str]:
    """Attention shapes that would only fail (with a reshape error) once a model is built: heads
    must divide the hidden size, and key/value heads the heads."""
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    kv = getattr(config, "num_key_value_heads", None)
    if not isinstance(heads, int) or not isinstance(hidden, int):
        return []
    problems = []
    if heads < 1 or hidden < 1:
        return [f"hidden_size ({hidden}) and num_attention_heads ({heads}) must be positive"]
    if getattr(config, "head_dim", None) in (None, hidden // heads) and hidden % heads:
        problems.append(f"num_attention_heads ({heads}) does not divide hidden_size ({hidden})")
    if isinstance(kv, int) and (kv < 1 or heads % kv):
        problems.append(f"num_key_value_heads ({kv}) does not divide num_attention_heads ({heads})")
    return problems


def load_teacher_config(spec: TeacherSpec, vocab_size: int | None, task: str = "causal_lm"):
    """The teacher's architecture without its weights (cheap: used for planning and students)."""
    if spec.init == "random":
        return random_teacher_config(spec, vocab_size, task)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(teacher_folder(spec), **_load_kwargs(spec))


def auto_model(task: str):
    from kdscale.models.task import TASK_CLASSES

    return TASK_CLASSES[task].auto_model()


def load_teacher(
    spec: TeacherSpec, vocab_size: int | None, seed: int, device: str | torch.device = "cpu", task: str = "causal_lm"
) -> torch.nn.Module:
    """Load the teacher in eval mode on ``device`` with the spec's dtype."""
    auto = auto_model(task)
    dtype = DTYPES[spec.dtype]
    if spec.init == "random":
        torch.manual_seed(seed)
        model = auto.from_config(random_teacher_config(spec, vocab_size, task), dtype=dtype)
    else:
        model = auto.from_pretrained(teacher_folder(spec), dtype=dtype, **_load_kwargs(spec))
    return model.to(device).eval()


def load_image_task(spec: TeacherSpec, teacher_config, height: int, width: int):
    """The image task a classifier teacher defines: its label names (config ``id2label``), its
    input channels, and the normalisation it was trained with (``preprocessor_config.json``
    beside its weights; none: pixels scaled to [0, 1])."""
    from kdscale.models.task import ImageClassification

    channels = int(getattr(teacher_config, "num_channels", 1))
    mean, std = (0.0,) * channels, (1.0,) * channels
    folder = teacher_folder(spec)
    if folder and fs.exists(fs.join(folder, "preprocessor_config.json")):
        pre = fs.read_json(fs.join(folder, "preprocessor_config.json"))
        if pre.get("do_normalize", True) and pre.get("image_mean") is not None:
            mean, std = tuple(map(float, pre["image_mean"])), tuple(map(float, pre["image_std"]))
    n = teacher_config.num_labels
    id2label = getattr(teacher_config, "id2label", None) or {}
    names = tuple(str(id2label.get(i, id2label.get(str(i), i))) for i in range(n))
    return ImageClassification((channels, height, width), mean, std, names)


def weight_files(spec: TeacherSpec) -> list[str]:
    folder = teacher_folder(spec)
    if folder is None:
        return []
    if spec.gguf_file:
        return [fs.join(folder, spec.gguf_file)]
    return [p for p in fs.expand(folder) if p.endswith(WEIGHT_SUFFIXES)]


def weight_problems(spec: TeacherSpec) -> list[str]:
    """Cheap integrity checks of the teacher's weight files (headers only, nothing loaded): a
    missing or truncated file must fail before any work, not minutes into loading on every actor."""
    if spec.init != "pretrained":
        return []
    files = weight_files(spec)
    if not files:
        return [f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {teacher_folder(spec)}"]
    problems = code_problems(teacher_folder(spec), spec.trust_remote_code)
    if all(f.endswith(PICKLE_SUFFIXES) for f in files):
        names = ", ".join(sorted(f.rsplit("/", 1)[-1] for f in files))
        problems.append(
            f"{teacher_folder(spec)} holds only pickle weights ({names}); "
            "kdscale never unpickles model files (they can run code): convert them to safetensors "
            "(model.save_pretrained(folder, safe_serialization=True) in a process you trust)"
        )
    for uri in files:
        try:
            if uri.endswith(".safetensors"):
                _check_safetensors(uri)
            elif uri.endswith(".gguf"):
                _check_gguf(uri)
        except (ValueError, OSError) as e:  # GGUFError is a ValueError
            problems.append(f"corrupt weights file {uri}: {e}")
    return problems


def _check_safetensors(uri: str) -> None:
    import json
    import struct

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


def _check_gguf(uri: str) -> None:
    from kdscale.models.gguf_check import check_gguf

    size = fs.size(uri)
    fsys, path = fs.filesystem(uri)
    with fsys.open(path, "rb", block_size=1 << 20) as f:
        check_gguf(f, size)


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


@dataclass(frozen=True)
class TeacherIdentity:
    name: str
    fingerprint: str
    dtype: str
    source: dict[str, Any]


def teacher_identity(spec: TeacherSpec, vocab_size: int | None, seed: int, task: str = "causal_lm") -> TeacherIdentity:
    """Fingerprint the teacher by content: hash of its weight files, or of its tensors for a
    random teacher. dtype is part of it because the same weights in bf16 give other targets."""
    if spec.init == "random":
        model = load_teacher(spec, vocab_size, seed, task=task)
        weights = tensors_fingerprint(model.state_dict())
        source = {"init": "random", "architecture": spec.architecture, "seed": seed}
    else:
        files = weight_files(spec)
        if not files:
            raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) under {teacher_folder(spec)}")
        weights = fs.hash_files(files)
        source = {"init": "pretrained", "path": spec.path, "gguf_file": spec.gguf_file}
    return TeacherIdentity(spec.name, digest({"weights": weights, "dtype": spec.dtype}), spec.dtype, source)


def architecture_dict(config) -> dict[str, Any]:
    """A config's architecture fields, minus storage details (quantization, dtype, origin)."""
    d = config.to_dict()
    for key in NON_ARCH_FIELDS:
        d.pop(key, None)
    return d
