"""Data side of the stack: the tokenizer that owns the special tokens, input readers, and the
staged preprocessing pipeline that writes Megatron indexed datasets."""
