"""lumen.engine.weights.quant against gguf-py's numpy reference: bit for bit, on random blocks and on real files.

The random tests overwrite every fp16 scale with finite values (zero, subnormal, huge, ordinary) so
they exercise the arithmetic rather than NaN propagation; raw F16/BF16/F32 values stay random.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from lumen.engine.weights.quant import QUANT_TYPES, dequantize
from tests.conftest import SHARED_DATA
from tests.engine.weights.quant.blocks import random_blocks

N_BLOCKS = 384
QUANT_DIR = SHARED_DATA / "quant"


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """Run these element-wise ops on one thread, then restore the setting.

    On a small shared CPU, OpenMP's thread start-up and spinning cost ~50x more than the work on
    these few-MB tensors; results are bit-identical at any thread count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_bit_exact(ours: torch.Tensor, ref: np.ndarray, what: str) -> None:
    """Equal bit patterns, except that any NaN matches any NaN.

    ggml (F16C / its scalar fallback) and torch quiet signalling fp16 NaNs while numpy keeps the
    payload as is, so NaN bits may differ; that only matters for raw random F16 data.
    """
    ref = np.ascontiguousarray(ref, dtype=np.float32).reshape(ours.shape)
    a, b = ours.numpy(), ref
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    same = (a.view(np.int32) == b.view(np.int32)) | (nan_a & nan_b)
    bad = int((~same).sum())
    assert bad == 0, f"{what}: {bad} of {a.size} values differ, first at {np.argwhere(~same)[0].tolist()}"


def reference(raw: np.ndarray, qtype: T) -> np.ndarray:
    with np.errstate(all="ignore"):  # random F16/BF16 data holds NaN and inf on purpose
        return gguf.quants.dequantize(raw, qtype)


@pytest.mark.parametrize("qtype", list(QUANT_TYPES), ids=lambda t: t.name)
def test_layout_matches_gguf(qtype: T) -> None:
    unit = QUANT_TYPES[qtype]
    assert (unit.block_size, unit.type_size) == gguf.GGML_QUANT_SIZES[qtype]


@pytest.mark.parametrize("qtype", list(QUANT_TYPES), ids=lambda t: t.name)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_blocks_bit_exact(qtype: T, seed: int) -> None:
    rng = np.random.default_rng([seed, int(qtype)])
    blocks = random_blocks(qtype, rng, N_BLOCKS)
    block_size = QUANT_TYPES[qtype].block_size
    raw = blocks.reshape(N_BLOCKS // 4, -1)  # 4 blocks per row, to exercise the row reshape too
    ours = dequantize(torch.from_numpy(raw), qtype, (N_BLOCKS // 4, 4 * block_size))
    assert ours.dtype == torch.float32 and ours.shape == (N_BLOCKS // 4, 4 * block_size)
    assert_bit_exact(ours, reference(raw, qtype), qtype.name)


def quant_files() -> list[Path]:
    return sorted(QUANT_DIR.glob("*.gguf")) if QUANT_DIR.is_dir() else []


def _require_files() -> list[Path]:
    files = quant_files()
    if not files:
        pytest.skip(f"no quantized GGUF files at {QUANT_DIR} (set LUMEN_SHARED_DATA to the shared data dir)")
    return files


def _raw_and_shape(tensor: gguf.ReaderTensor) -> tuple[np.ndarray, tuple[int, ...]]:
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # numpy order: rows..., cols
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return np.asarray(tensor.data).view(np.uint8).reshape(rows, -1), shape


@pytest.mark.parametrize("name", [p.name for p in quant_files()] or ["<no files>"])
def test_real_file_bit_exact(name: str) -> None:
    _require_files()
    reader = gguf.GGUFReader(QUANT_DIR / name)
    for tensor in reader.tensors:
        raw, shape = _raw_and_shape(tensor)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only memmap; we never write to it
            ours = dequantize(raw, tensor.tensor_type, shape)
        assert_bit_exact(ours, reference(raw, tensor.tensor_type), f"{name}:{tensor.name}")


def test_registry_covers_every_type_in_the_files() -> None:
    seen = {t.tensor_type for path in _require_files() for t in gguf.GGUFReader(path).tensors}
    missing = sorted(t.name for t in seen - QUANT_TYPES.keys())
    assert not missing, f"types in the shared files without a dequantizer: {missing}"


def test_unregistered_type_raises_value_error_naming_it() -> None:
    unregistered = next(t for t in T if t not in QUANT_TYPES)
    with pytest.raises(ValueError, match=unregistered.name):
        dequantize(torch.zeros(1, 64, dtype=torch.uint8), unregistered, (1, 64))


def test_byte_count_mismatch_raises_value_error() -> None:
    with pytest.raises(ValueError, match="Q4_0"):
        dequantize(torch.zeros(1, 17, dtype=torch.uint8), T.Q4_0, (1, 32))


@pytest.mark.parametrize("qtype", sorted(QUANT_TYPES, key=int), ids=lambda t: t.name)
def test_blocks_decode_on_the_device_they_are_on(qtype):
    """A GPU decodes the types its Triton kernels lack where their blocks are (the device weights'
    chunked path): no lookup table may stay behind on the CPU. The meta device stands for the GPU
    here: any tensor of another device in the computation fails or leaks into the result."""
    unit = QUANT_TYPES[qtype]
    raw = torch.empty((3, 2 * unit.type_size), dtype=torch.uint8, device="meta")
    out = dequantize(raw, qtype, (3, 2 * unit.block_size))
    assert out.device.type == "meta" and out.shape == (3, 2 * unit.block_size)
