"""Data pipeline: corpus -> tokenizer -> packed token shards -> distributed, resumable loader."""
