"""Train a byte-level BPE tokenizer on texts and save it as a Hugging Face folder.

A tokenizer independent of the teacher's, for students with their own tokenizer in tests and
benchmarks (benchmarks/cross_tokenizer.py trains an 8k one on the training slice): byte-level, so
every text is representable and its tokens' bytes are exact (kdscale.data.alignment).
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")


def train_bpe(texts: Iterable[str], vocab_size: int, dest: str) -> str:
    """Train on ``texts`` (deterministic for the same texts and size) and save to ``dest``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    eos, pad = SPECIAL_TOKENS
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=pad)
    fast.save_pretrained(dest)
    return dest
