"""A sharded teacher (layer ranges over pipeline stages) computes what the whole teacher does."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from kdscale.models.sharding import ShardingError, layer_ranges, split
from tests.conftest import SMOLLM2_SHAPE, llama_config


def _tiny(tied: bool, layers: int = 4, vocab: int = 300):
    cfg = llama_config(num_hidden_layers=layers, vocab_size=vocab, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("shards", [1, 2, 3, 4])
def test_stages_chain_to_the_unsharded_logits(tied, shards):
    model = _tiny(tied)
    ids = torch.randint(0, 300, (3, 40))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        x = ids
        for start, end in layer_ranges(model.config, shards):
            x = split(copy.deepcopy(model), start, end)(x)
    assert (x - reference).abs().max().item() <= 1e-5


def test_ranges_cover_every_layer_once_and_balance_the_head():
    cfg = llama_config(**SMOLLM2_SHAPE)
    ranges = layer_ranges(cfg, 2)
    assert ranges[0][0] == 0 and ranges[-1][1] == 30 and ranges[0][1] == ranges[1][0]
    # the LM head (~7 layers of compute here) pushes the cut past the middle
    assert ranges[0][1] > 15
    assert layer_ranges(cfg, 30) == [(i, i + 1) for i in range(30)]
    with pytest.raises(ShardingError, match="cannot split 30 layers into 31"):
        layer_ranges(cfg, 31)


def test_stage_frees_what_it_does_not_run():
    model = _tiny(False, layers=4)
    first = split(copy.deepcopy(model), 0, 2)
    last = split(copy.deepcopy(model), 2, 4)
    assert len(first.base.layers) == 2 and first.lm_head is None
    assert last.base.embed_tokens is None and last.lm_head is not None
