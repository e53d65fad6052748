"""Rebuild jobs/assets/tiny-tokenizer: a 512-token byte-level BPE trained on the tiny corpus.

Tests and jobs/tiny.yaml use it so a tiny random teacher has a tiny vocabulary (fast on CPU).
Run: python jobs/assets/build_tiny_tokenizer.py  (deterministic; commit the result).
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).parent
SPECIAL = ["<|endoftext|>", "<|pad|>"]


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(sorted(str(p) for p in (HERE / "tiny-corpus").glob("*.rst")), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL[0], bos_token=SPECIAL[0], pad_token=SPECIAL[1])
    fast.save_pretrained(HERE / "tiny-tokenizer")


if __name__ == "__main__":
    main()
