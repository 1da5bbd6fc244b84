"""The JSON files of a Hugging Face model directory (config.json, tokenizer.json, ...).

Shared by the weight loader (weights/hf_loader.py) and the vocabulary reader
(tokenizer/hf_vocab.py); a bad file is a ModelLoadError naming it.
"""
from __future__ import annotations

import json
from pathlib import Path

from lumen.engine.errors import ModelLoadError


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`, or a ModelLoadError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing ({what} needs it)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
