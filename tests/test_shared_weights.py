"""Teacher replicas mapping one copy of the weights (kdscale.models.shared_weights): the teacher
built around exported weights computes exactly what the loaded one does, without copying them,
and on Ray every actor's weights are the object store's memory."""

from __future__ import annotations

import pytest
import torch

from kdscale.config import TeacherSpec
from kdscale.models.shared_weights import export_weights, weight_tensors
from kdscale.teachers import load_teacher, teacher_from_weights

ARCH = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}


def _teacher(dtype: str = "float32") -> TeacherSpec:
    return TeacherSpec(name="t", init="random", architecture=ARCH, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_teacher_around_shared_weights_equals_loaded_one(dtype):
    spec = _teacher(dtype)
    loaded = load_teacher(spec, 120, seed=5)
    shared = export_weights(loaded)
    rebuilt = teacher_from_weights(spec, shared)
    ids = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).logits, rebuilt(input_ids=ids).logits)
    assert rebuilt.lm_head.weight.dtype == getattr(torch, dtype)
    # the tied head is stored once, and both names view that one array
    assert shared.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert rebuilt.lm_head.weight.data_ptr() == rebuilt.model.embed_tokens.weight.data_ptr()
    # nothing was copied: every parameter is a view of its exported array
    arrays = {name: shared.arrays[shared.aliases.get(name, name)] for name in rebuilt.state_dict()}
    for name, tensor in rebuilt.state_dict().items():
        assert tensor.data_ptr() == arrays[name].ctypes.data, name
    assert shared.nbytes == sum(p.numel() * p.element_size() for p in loaded.parameters())


def test_weight_tensors_keep_shapes_and_scalars():
    model = torch.nn.BatchNorm1d(3)  # running stats and an int64 scalar buffer
    model.running_mean += 2.0
    tensors = weight_tensors(export_weights(model))
    assert tensors["num_batches_tracked"].dtype == torch.int64 and tensors["num_batches_tracked"].shape == ()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensors[name], tensor), name


@pytest.mark.ray
def test_replicas_map_the_object_stores_copy(ray_session, tmp_path):
    import numpy as np
    import ray

    from kdscale.cache.format import TargetsInfo
    from kdscale.config import load_job
    from kdscale.precompute.runner import shared_weights
    from kdscale.precompute.worker import TeacherWorker
    from tests.conftest import write_job

    spec = load_job(write_job(tmp_path, **{"teacher.architecture": ARCH}))
    vocab = 4000  # weights over Ray's 100 KB inline limit (smaller objects are copied into each process)
    assert shared_weights(spec, vocab, "causal_lm", actors=1) is None  # one actor: nothing to share
    off = spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"share_weights": False})})
    assert shared_weights(off, vocab, "causal_lm", actors=2) is None
    gpu = spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"num_gpus": 1.0})})
    assert shared_weights(gpu, vocab, "causal_lm", actors=2) is None  # GPU actors load their own
    weights = shared_weights(spec, vocab, "causal_lm", actors=2)
    kwargs = {
        "vocab_size": vocab,
        "seed": spec.seed,
        "targets": TargetsInfo(kind="topk", k=4, temperature=1.0, seed=0),
        "cache_uri": str(tmp_path),
        "rank": np.arange(vocab),
    }
    actor = ray.remote(TeacherWorker).options(num_cpus=0).remote(spec.teacher, weights=weights, **kwargs)
    own = ray.remote(TeacherWorker).options(num_cpus=0).remote(spec.teacher, **kwargs)

    def head_mapping(worker):
        """The file behind the memory mapping that holds the head's weights ('' if anonymous)."""
        address = worker.model.lm_head.weight.data_ptr()
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if start <= address < end:
                    return fields[5] if len(fields) > 5 else ""
        return None

    shared_file, own_file = ray.get([a.__ray_call__.remote(head_mapping) for a in (actor, own)])
    assert "plasma" in shared_file  # Ray's object store (a file in /dev/shm or Ray's temp dir)
    assert "plasma" not in own_file  # its own heap
    for a in (actor, own):
        ray.kill(a)
