"""Inference: generation, speculative decoding, the tokenizer and chat format."""
