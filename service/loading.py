"""Resolve and load the models a server is asked to serve, with a progress bar."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm import tqdm

from lumen.engine.demo.demo_model import ensure_demo_model
from lumen.engine.weights.loaded_model import LoadedModel
from lumen.engine.weights.model_files import load_model


def load_models(specs: list[tuple[str | None, Path]], dtype: torch.dtype) -> list[LoadedModel]:
    """Load each (name, path), a GGUF file or a Hugging Face directory; with no spec, write (once)
    and load the embedded demo model."""
    if not specs:
        path = ensure_demo_model()
        print(f"lumen: no --model given; serving the embedded demo model {path} "
              "(random weights: its text is not meaningful)", file=sys.stderr)
        specs = [("lumen-demo", path)]
    return [load_with_progress(path, dtype, name) for name, path in specs]


def load_with_progress(path: Path, dtype: torch.dtype, name: str | None = None) -> LoadedModel:
    """One model (a served model or a speculative draft), with its own progress bar."""
    with tqdm(desc=f"loading {path.name}", unit="layer", file=sys.stderr, leave=False) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
        return load_model(path, dtype=dtype, name=name, progress=progress)
