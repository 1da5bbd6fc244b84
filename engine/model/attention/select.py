"""Which attention backend a device gets: Triton on CUDA when triton imports, torch otherwise.

LUMEN_ATTENTION_BACKEND=torch|triton overrides the choice (triton on a CPU device only runs
with TRITON_INTERPRET=1 set before the kernels are imported, which is for tests). It must
never fall back silently when an override cannot be honoured: it raises with the reason.
"""
from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import torch

from lumen.engine.model.attention.torch_backend import TorchAttention

if TYPE_CHECKING:
    from lumen.engine.model.attention.triton_backend import TritonAttention

ENV_VAR = "LUMEN_ATTENTION_BACKEND"


def select_backend(device: torch.device) -> TorchAttention | TritonAttention:
    """The backend for `device`, honouring LUMEN_ATTENTION_BACKEND when it is set."""
    wanted = os.environ.get(ENV_VAR, "").strip().lower()
    if wanted not in ("", "torch", "triton"):
        raise ValueError(f"{ENV_VAR}={wanted!r} is not a backend: use 'torch' or 'triton', or unset it")
    if wanted == "torch" or (not wanted and (device.type != "cuda" or not triton_imports())):
        return TorchAttention()
    if not triton_imports():
        raise ValueError(f"{ENV_VAR}=triton but triton does not import: install it or use 'torch'")
    from lumen.engine.model.attention.triton_backend import TritonAttention
    from lumen.engine.triton_kernels import paged_attention

    if device.type != "cuda" and not paged_attention.INTERPRETED:
        raise ValueError(f"{ENV_VAR}=triton on a {device.type} device needs TRITON_INTERPRET=1 "
                         "set before the kernels are imported; use 'torch' instead")
    return TritonAttention()


@functools.cache
def triton_imports() -> bool:
    """Whether triton imports here (tried once, lazily: CPU-only runs never pay for it or trip over it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
