"""Query and key rows in Hugging Face's RoPE layout and GGUF's: the model's own weights and a
LoRA adapter's B (which writes those rows) are reordered alike. Imports nothing of the engine."""
from __future__ import annotations

import torch


def hf_to_gguf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows from HF's RoPE layout to GGUF's: in each head, rows (i, i + head_dim/2)
    rotate together in HF; GGUF wants them adjacent, at (2i, 2i + 1)."""
    # w: [n_heads * head_dim, dim]
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
