"""One entry point for every model format: a directory is a Hugging Face checkpoint, a file is GGUF."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from lumen.engine.errors import ModelLoadError
from lumen.engine.weights.gguf_loader import load_gguf
from lumen.engine.weights.hf_loader import load_hf_dir
from lumen.engine.weights.loaded_model import LoadedModel


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, name: str | None = None,
               progress: Callable[[int, int], None] | None = None) -> LoadedModel:
    """Load a GGUF file or a Hugging Face Llama directory; `progress(done_layers, total_layers)`."""
    path = Path(path)
    if path.is_dir():
        return load_hf_dir(path, dtype=dtype, name=name, progress=progress)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory (give a .gguf file or a Hugging Face "
                             "model directory)")
    return load_gguf(path, dtype=dtype, name=name, progress=progress)
