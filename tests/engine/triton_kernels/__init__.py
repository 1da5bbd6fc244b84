"""Tests of the Triton kernels; `import_kernels` gives a test module its kernel module, or why not."""
from __future__ import annotations

import importlib
import os

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def import_kernels(name: str, what: str):
    """(lumen.engine.triton_kernels.`name`, None), or (None, why its tests cannot run). Without
    CUDA, the kernels must be decorated under TRITON_INTERPRET=1, so it is set before the import."""
    if DEVICE.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"   # read when the kernels are decorated, and by triton later
    try:
        module = importlib.import_module(f"lumen.engine.triton_kernels.{name}")
    except ImportError as exc:
        return None, f"triton is not importable ({exc}); the {what} kernels are untested"
    if DEVICE.type == "cpu" and not module.INTERPRETED:
        return None, f"lumen.engine.triton_kernels.{name} was imported before TRITON_INTERPRET=1; rerun with it set"
    return module, None
