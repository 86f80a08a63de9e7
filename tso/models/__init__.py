"""Checkpoints: resolving, loading, chat templates and stop tokens, GGUF import, the real-model fixture. Imports no ray."""
