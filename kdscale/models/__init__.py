"""Model-side code: loading teachers, tokenizers and students. Knows nothing of Ray or DeepSpeed."""
