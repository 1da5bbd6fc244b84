"""Attention over the paged KV cache: one interface, a torch backend (CPU) and a Triton backend (CUDA)."""
from lumen.engine.model.attention.metadata import AttentionMetadata, write_kv

__all__ = ["AttentionMetadata", "write_kv"]
