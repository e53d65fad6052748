"""The Hugging Face backend: a transformers model folder, a GGUF file (de-quantized by
transformers), or a seeded random model for tests. It returns full logits, so it serves every
target kind.

Kept free of Ray so the same code runs in a precompute actor, a benchmark's bare loop, or a test.
"""

from __future__ import annotations

from typing import Any

import torch

from kdscale import fs
from kdscale.config import TeacherSpec, resolve_package_path
from kdscale.fingerprint import digest, tensors_fingerprint
from kdscale.models import files
from kdscale.models.arch import shape_problems, unknown_fields
from kdscale.teachers.base import FULL_LOGITS, TOP_K, TeacherBackend, TeacherIdentity
from kdscale.user_cache import files_sha256

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def teacher_folder(spec: TeacherSpec) -> str | None:
    if spec.path is None:
        return None
    return resolve_package_path(spec.path) if spec.path.startswith("pkg:") else spec.path


def _load_kwargs(spec: TeacherSpec) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    return kwargs


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


def auto_model(task: str):
    from kdscale.models.task import TASK_CLASSES

    return TASK_CLASSES[task].auto_model()


def _gguf_metadata(spec: TeacherSpec) -> str | None:
    """A GGUF teacher's tokenizer and config as plain files, converted once (None: not GGUF)."""
    folder = teacher_folder(spec)
    if not spec.gguf_file or folder is None:
        return None
    from kdscale.teachers.gguf_metadata import converted_folder

    return converted_folder(folder, spec.gguf_file, spec.trust_remote_code)


def weight_files(spec: TeacherSpec) -> list[str]:
    folder = teacher_folder(spec)
    if folder is None:
        return []
    if spec.gguf_file:
        return [fs.join(folder, spec.gguf_file)]
    return [p for p in fs.expand(folder) if p.endswith(files.WEIGHT_SUFFIXES)]


class HuggingFace(TeacherBackend):
    name = "huggingface"
    outputs = frozenset({FULL_LOGITS, TOP_K})
    shares_weights = True

    def problems(self, spec):
        if spec.init != "pretrained":
            return []
        folder = teacher_folder(spec)
        found = weight_files(spec)
        if not found:
            return [f"no weight files ({', '.join(files.WEIGHT_SUFFIXES)}) in {folder}"]
        return (
            files.code_problems(folder, spec.trust_remote_code)
            + files.pickle_only_problem(str(folder), found)
            + files.corruption_problems(found)
        )

    def tokenizer(self, spec):
        from transformers import AutoTokenizer

        if spec.tokenizer:
            folder = resolve_package_path(spec.tokenizer) if spec.tokenizer.startswith("pkg:") else spec.tokenizer
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=spec.trust_remote_code)
        converted = _gguf_metadata(spec)
        if converted:
            return AutoTokenizer.from_pretrained(converted)
        return AutoTokenizer.from_pretrained(teacher_folder(spec), **_load_kwargs(spec))

    def config(self, spec, vocab_size, task="causal_lm"):
        if spec.init == "random":
            return random_teacher_config(spec, vocab_size, task)
        from transformers import AutoConfig

        converted = _gguf_metadata(spec)
        if converted:
            return AutoConfig.from_pretrained(converted)
        return AutoConfig.from_pretrained(teacher_folder(spec), **_load_kwargs(spec))

    def load(self, spec, vocab_size, seed, device="cpu", task="causal_lm"):
        auto = auto_model(task)
        dtype = DTYPES[spec.dtype]
        if spec.init == "random":
            torch.manual_seed(seed)
            model = auto.from_config(random_teacher_config(spec, vocab_size, task), dtype=dtype)
        else:
            model = auto.from_pretrained(teacher_folder(spec), dtype=dtype, **_load_kwargs(spec))
        return model.to(device).eval()

    def from_weights(self, spec, weights, task="causal_lm"):
        """The module from its config with initialisation skipped (its weights are assigned next,
        so drawing random ones would be wasted: 1.9 s for SmolLM2-135M on one core, 0.01 s
        skipped); non-persistent buffers (rotary frequencies) are computed by the module itself."""
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # transformers 4.x
            from transformers.modeling_utils import no_init_weights

        from kdscale.models.shared_weights import weight_tensors

        with no_init_weights():
            model = auto_model(task).from_config(weights.config, dtype=DTYPES[spec.dtype])
        model.load_state_dict(weight_tensors(weights), strict=True, assign=True)
        return model.eval()

    def identity(self, spec, vocab_size, seed, task="causal_lm"):
        """Fingerprint the teacher by content: hash of its weight files, or of its tensors for a
        random teacher. dtype is part of it because the same weights in bf16 give other targets."""
        if spec.init == "random":
            model = self.load(spec, vocab_size, seed, task=task)
            weights = tensors_fingerprint(model.state_dict())
            source: dict[str, Any] = {"init": "random", "architecture": spec.architecture, "seed": seed}
        else:
            found = weight_files(spec)
            if not found:
                raise FileNotFoundError(
                    f"no weight files ({', '.join(files.WEIGHT_SUFFIXES)}) under {teacher_folder(spec)}"
                )
            weights = files_sha256(found)  # remembered per file version (kdscale.user_cache)
            source = {"init": "pretrained", "path": spec.path, "gguf_file": spec.gguf_file}
        source["backend"] = self.name  # provenance only: the fingerprint is the content
        return TeacherIdentity(spec.name, digest({"weights": weights, "dtype": spec.dtype}), spec.dtype, source)

    def image_task(self, spec, config, height, width):
        """Labels from the config's ``id2label``, input channels, and the normalisation the
        teacher was trained with (``preprocessor_config.json`` beside its weights; none: pixels
        scaled to [0, 1])."""
        from kdscale.models.task import ImageClassification

        channels = int(getattr(config, "num_channels", 1))
        mean, std = (0.0,) * channels, (1.0,) * channels
        folder = teacher_folder(spec)
        if folder and fs.exists(fs.join(folder, "preprocessor_config.json")):
            pre = fs.read_json(fs.join(folder, "preprocessor_config.json"))
            if pre.get("do_normalize", True) and pre.get("image_mean") is not None:
                mean, std = tuple(map(float, pre["image_mean"])), tuple(map(float, pre["image_std"]))
        n = config.num_labels
        id2label = getattr(config, "id2label", None) or {}
        names = tuple(str(id2label.get(i, id2label.get(str(i), i))) for i in range(n))
        return ImageClassification((channels, height, width), mean, std, names)
