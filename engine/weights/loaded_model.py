"""What a loader returns: a model's config, weights and tokenizer, with what ListModels reports."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lumen.engine.model.config import ModelConfig
from lumen.engine.model.llama import LlamaWeights
from lumen.engine.tokenizer.tokenizer import Tokenizer


@dataclass(slots=True)
class LoadedModel:
    name: str
    path: Path            # the file or directory it was loaded from (the server logs it; clients see its name)
    config: ModelConfig
    weights: LlamaWeights
    tokenizer: Tokenizer
    file_type: str
    parameter_count: int
    chat_template: str | None = None  # the model's own Jinja chat template (GGUF metadata or tokenizer_config.json)
