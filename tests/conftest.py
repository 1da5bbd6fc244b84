"""Fixtures shared by the whole suite: where the shared test data lives."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without CUDA, the Triton kernels can only run interpreted; the flag must be set before
# anything imports triton (kernels are decorated at import). CPU engines use the torch backend.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("LUMEN_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_file(*parts: str) -> Path:
    """A file of ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data not found at {path} (set LUMEN_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def stories_path() -> Path:
    return shared_file("models", "stories260K.gguf")


@pytest.fixture(scope="session")
def stories_model(stories_path):
    from lumen.engine.weights.gguf_loader import load_gguf
    return load_gguf(stories_path)


@pytest.fixture(scope="session")
def stories_draft_model():
    """A second TinyStories model with stories260K's vocabulary: a speculative draft for it."""
    from lumen.engine.weights.gguf_loader import load_gguf
    return load_gguf(shared_file("models", "llama2xs-stories-tok512.gguf"))


@pytest.fixture(scope="session")
def stories_greedy() -> tuple[list[int], str]:
    """The oracle: 200 greedy ids after BOS, and their text."""
    ids = [int(x) for x in shared_file("models", "stories260K.greedy200.ids").read_text().split()]
    text = shared_file("models", "stories260K.greedy200.txt").read_bytes().decode("utf-8")
    return ids[1:], text


@pytest.fixture(scope="session")
def smollm2_model():
    """SmolLM2-135M-Instruct (Q4_1), a real instruction-tuned model with a ChatML template.
    Engines set its matmul mode from their config (exact unless asked)."""
    from lumen.engine.weights.gguf_loader import load_gguf
    return load_gguf(shared_file("models", "SmolLM2-135M-Instruct.Q4_1.gguf"))


def smollm2_ids(name: str, kind: str) -> list[int]:
    """The ids of a SmolLM2 reference file: NAME.{prompt,greedy}.ids (shared/data/models/README)."""
    path = shared_file("models", f"SmolLM2-135M-Instruct.{name}.{kind}.ids")
    return [int(t) for t in path.read_text().split()]
