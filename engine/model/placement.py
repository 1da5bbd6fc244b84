"""Where a model computes: the device, the kernel family and the activation dtype.

`native` is the C kernels of lumen.engine.native on the CPU; `triton` is the Triton kernels of
lumen.engine.triton_kernels (paged attention, quantized GEMV/GEMM), on CUDA, or on a CPU device
under TRITON_INTERPRET=1, which exists for tests. A choice that cannot be honoured raises
ValueError with what to change: never a silent fallback to another device or kernel family.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DEVICES = ("auto", "cuda", "cpu")
KERNELS = ("auto", "native", "triton")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class Placement:
    device: torch.device
    kernels: str           # "native" or "triton"
    dtype: torch.dtype     # activations and the KV cache

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def device_name(self) -> str:
        """What ListModels and the startup log say: 'cpu' or 'cuda:0 (NVIDIA H100 80GB HBM3)'."""
        if not self.on_cuda:
            return "cpu"
        return f"{self.device} ({torch.cuda.get_device_name(self.device)})"

    @property
    def dtype_name(self) -> str:
        """'float32', 'bfloat16', ..."""
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> str:
        return f"device {self.device_name}, kernels {self.kernels}, dtype {self.dtype_name}"


CPU_NATIVE = Placement(torch.device("cpu"), "native", torch.float32)


def resolve_placement(device: str = "auto", kernels: str = "auto", dtype: str | torch.dtype = "auto") -> Placement:
    """The placement asked for, checked: `device` and `kernels` from DEVICES and KERNELS, `dtype` a
    DTYPES name or a torch dtype (auto: bfloat16 on CUDA, float32 on the CPU)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                         "install a CUDA build of torch or use --device cpu")
    if kernels == "auto":
        kernels = "triton" if device == "cuda" else "native"
    if kernels == "native" and device == "cuda":
        raise ValueError("--kernels native are the C kernels, which run on the CPU only: use --kernels triton "
                         "(or auto) on --device cuda")
    if kernels == "triton":
        _check_triton(device)
    if dtype is None:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if kernels == "native" and dtype == torch.float16:
        raise ValueError("the native kernels compute in float32 or bfloat16, not float16; use --dtype float32")
    if device == "cpu" and kernels == "triton" and dtype != torch.float32:
        raise ValueError("--kernels triton on --device cpu runs interpreted, where only float32 arithmetic is "
                         f"exact; use --dtype float32 (got {dtype})")
    return Placement(torch.device(device if device == "cpu" else "cuda:0"), kernels, dtype)


def _check_triton(device: str) -> None:
    from lumen.engine.model.attention.select import triton_imports
    if not triton_imports():
        raise ValueError("--kernels triton: the triton package does not import; install it "
                         "(pip install 'lumen[cuda]') or use --kernels native")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--kernels triton on --device cpu runs the kernels in Triton's interpreter, which needs "
                         "TRITON_INTERPRET=1 in the environment before the server starts (it exists for tests); "
                         "use --kernels native for the CPU")


def cuda_memory(device: torch.device) -> dict[str, int]:
    """torch's memory on a CUDA device by state: allocated (tensors) and reserved (its cache)."""
    return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device)}
