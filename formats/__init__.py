"""File formats: the GGUF reader, tokenizers built from a GGUF vocabulary, chat templates."""
