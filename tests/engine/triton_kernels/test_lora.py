"""lora_shrink / lora_expand against their float64 references, for batches that mix adapters.

Every run draws fresh inputs; a failure prints the seed that rebuilds them (SEED=... to replay).
Rows with slot -1 sit between rows of three adapters; r, k and n are mostly not powers of two
nor multiples of the tiles, and y is often a column slice of a wider tensor whose other columns
are NaN, so a write outside y shows. Without CUDA the kernels run under TRITON_INTERPRET=1 on
CPU tensors, on small shapes.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

from tests.engine.triton_kernels import DEVICE, import_kernels

KERNELS, NO_TRITON = import_kernels("lora", "LoRA")
pytestmark = pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")

N_ADAPTERS = 3
# t is fp32 whatever x's dtype (the inputs are the same exact values for kernel and reference, so
# only fp32 summation order differs); y's bound adds one rounding to its own dtype (8 or 11 bits).
T_TOL = {"rtol": 1e-5, "atol": 1e-5}
Y_TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float16: {"rtol": 2e-3, "atol": 2e-3},
         torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2}}

# (m, k, r, n): r of 1, 12 (not a power of two) and 16; k and n off the tile sizes; m = 1 is decode.
SHAPES = [(1, 64, 16, 96), (5, 200, 12, 136), (8, 256, 7, 250), (6, 33, 1, 17), (3, 130, 64, 255)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("SEED", "0")) or random.SystemRandom().randrange(1, 2**31)


def random_slots(m: int, gen: torch.Generator) -> torch.Tensor:
    """Each row's adapter in [-1, N_ADAPTERS); with m >= 4, at least one -1 and one adapter."""
    slots = torch.randint(-1, N_ADAPTERS, (m,), generator=gen)
    if m >= 4:
        slots[0], slots[-1] = -1, m % N_ADAPTERS
    return slots


def make_inputs(m: int, k: int, r: int, n: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """CPU tensors: x [m, k] and y [m, n] in dtype, a and b in dtype too (the adapters' usual storage)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn((m, k), generator=gen).to(dtype),
        "a": (torch.randn((N_ADAPTERS, r, k), generator=gen) / k ** 0.5).to(dtype),
        "b": (torch.randn((N_ADAPTERS, n, r), generator=gen) / r ** 0.5).to(dtype),
        "y": torch.randn((m, n), generator=gen).to(dtype),
        "scales": torch.rand((m,), generator=gen) * 2,
        "slots": random_slots(m, gen)}


def check_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, where: str) -> torch.Tensor:
    """Run lora_shrink on DEVICE copies of the CPU inputs; return the reference t (CPU, fp32)."""
    t = KERNELS.lora_shrink(x.to(DEVICE), a.to(DEVICE), slots.to(DEVICE))
    assert t.shape == (x.shape[0], a.shape[1]) and t.dtype == torch.float32 and t.device.type == DEVICE.type
    want = KERNELS.lora_shrink_reference(x, a, slots)
    torch.testing.assert_close(t.cpu(), want, **T_TOL, msg=lambda e: f"shrink: {e}\n{where}")
    assert (t.cpu()[slots < 0] == 0).all(), f"shrink: rows of slot -1 are not zero; {where}"
    return want


def check_expand(t: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor, y0: torch.Tensor,
                 y: torch.Tensor, where: str) -> None:
    """Run lora_expand into y (on DEVICE, holding a copy of the CPU y0) and compare with the reference.
    t's rows of slot -1 are set to ones first: a kernel that expanded them would change y."""
    t = t.clone()
    t[slots < 0] = 1.0
    KERNELS.lora_expand(t.to(DEVICE), b.to(DEVICE), slots.to(DEVICE), scales.to(DEVICE), y)
    want = y0.double()
    KERNELS.lora_expand_reference(t, b, slots, scales, want)
    torch.testing.assert_close(y.cpu().double(), want, **Y_TOL[y.dtype], msg=lambda e: f"expand: {e}\n{where}")
    idle = slots < 0
    assert torch.equal(y.cpu()[idle], y0[idle]), f"expand: changed rows of slot -1; {where}"


def wide_view(y: torch.Tensor, left: int, right: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a NaN-filled [m, left + n + right] tensor on DEVICE, its columns that hold a copy of y)."""
    m, n = y.shape
    wide = torch.full((m, left + n + right), float("nan"), dtype=y.dtype, device=DEVICE)
    view = wide[:, left:left + n]
    view.copy_(y)
    return wide, view


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "m{}-k{}-r{}-n{}".format(*s))
def test_shrink_then_expand_match_reference(shape, dtype: torch.dtype, slot_dtype: torch.dtype, seed: int) -> None:
    m, k, r, n = shape
    inp = make_inputs(m, k, r, n, dtype, seed)
    slots = inp["slots"].to(slot_dtype)
    where = f"m={m} k={k} r={r} n={n} {dtype} slots={slots.tolist()}; replay with SEED={seed}"
    t = check_shrink(inp["x"], inp["a"], slots, where)
    # Expand the reference's t (so the two kernels are judged apart) into a slice of a wider y.
    wide, y = wide_view(inp["y"], left=3, right=5)
    check_expand(t, inp["b"], slots, inp["scales"], inp["y"], y, where)
    assert torch.isnan(wide[:, :3]).all() and torch.isnan(wide[:, 3 + n:]).all(), f"expand wrote outside y; {where}"


def test_strided_x_and_mixed_adapter_dtypes(seed: int) -> None:
    """x may be a column slice (rows further apart than k); a and b need not share x's or y's dtype."""
    m, k, r, n = 4, 96, 12, 40
    inp = make_inputs(m, k, r, n, torch.float32, seed)
    x = torch.randn((m, k + 20), generator=torch.Generator().manual_seed(seed + 1)).to(torch.bfloat16)[:, 7:7 + k]
    where = f"replay with SEED={seed}"
    t = check_shrink(x, inp["a"].to(torch.float16), inp["slots"], where)
    y = inp["y"].to(DEVICE, copy=True)    # not inp["y"] itself on CPU: the reference starts from it
    check_expand(t, inp["b"].to(torch.bfloat16), inp["slots"], inp["scales"], inp["y"], y, where)


def test_several_tiles_of_k_r_and_n(seed: int, monkeypatch) -> None:
    """Small tiles: several K tiles and a masked tail in the shrink, several r tiles in the expand."""
    monkeypatch.setattr(KERNELS, "_shrink_config", lambda r, k: (4, 32, 4))
    monkeypatch.setattr(KERNELS, "_expand_config", lambda n, r: (16, 4, 4))
    m, k, r, n = 5, 100, 10, 50
    inp = make_inputs(m, k, r, n, torch.float32, seed)
    where = f"4x32 shrink tiles, 16x4 expand tiles; replay with SEED={seed}"
    t = check_shrink(inp["x"], inp["a"], inp["slots"], where)
    wide, y = wide_view(inp["y"], left=16, right=14)
    check_expand(t, inp["b"], inp["slots"], inp["scales"], inp["y"], y, where)
    assert torch.isnan(wide[:, :16]).all() and torch.isnan(wide[:, 16 + n:]).all(), f"expand wrote outside y; {where}"


def test_all_rows_without_adapter_and_empty_batch() -> None:
    x = torch.randn(3, 40, device=DEVICE)
    a, b = torch.randn(2, 8, 40, device=DEVICE), torch.randn(2, 24, 8, device=DEVICE)
    none = torch.full((3,), -1, dtype=torch.int32, device=DEVICE)
    assert torch.equal(KERNELS.lora_shrink(x, a, none).cpu(), torch.zeros(3, 8))
    y = torch.randn(3, 24, device=DEVICE)
    before = y.clone()
    KERNELS.lora_expand(torch.randn(3, 8, device=DEVICE), b, none, torch.ones(3, device=DEVICE), y)
    assert torch.equal(y, before)
    empty = torch.empty(0, dtype=torch.int64, device=DEVICE)
    assert KERNELS.lora_shrink(x[:0], a, empty).shape == (0, 8)
    KERNELS.lora_expand(torch.empty(0, 8, device=DEVICE), b, empty, torch.empty(0, device=DEVICE), y[:0])


def test_bad_inputs_raise_clear_errors() -> None:
    x, slots = torch.randn(2, 64, device=DEVICE), torch.tensor([0, -1], device=DEVICE)
    a, b = torch.randn(3, 8, 64, device=DEVICE), torch.randn(3, 32, 8, device=DEVICE)
    t, scales, y = torch.randn(2, 8, device=DEVICE), torch.ones(2, device=DEVICE), torch.zeros(2, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"x has k=48 input features but the adapters a \[3, 8, 64\] have k=64"):
        KERNELS.lora_shrink(x[:, :48], a, slots)
    with pytest.raises(ValueError, match="x must be float32, bfloat16 or float16"):
        KERNELS.lora_shrink(x.double(), a, slots)
    with pytest.raises(ValueError, match=r"x's rows must be contiguous"):
        KERNELS.lora_shrink(torch.randn(64, 2, device=DEVICE).T, a, slots)
    with pytest.raises(ValueError, match=r"slots must be \[2\]"):
        KERNELS.lora_shrink(x, a, slots[:1])
    with pytest.raises(ValueError, match="slots must be int32 or int64"):
        KERNELS.lora_shrink(x, a, slots.float())
    with pytest.raises(ValueError, match=r"y must be \[m, n\] = \[2, 32\], got shape \(2, 31\)"):
        KERNELS.lora_expand(t, b, slots, scales, y[:, :31])
    with pytest.raises(ValueError, match=r"t has width 6 but the adapters b \[3, 32, 8\] have rank r=8"):
        KERNELS.lora_expand(t[:, :6], b, slots, scales, y)
    with pytest.raises(ValueError, match="t must be a float32"):
        KERNELS.lora_expand(t.half(), b, slots, scales, y)
    with pytest.raises(ValueError, match=r"scales must be a float32 \[2\]"):
        KERNELS.lora_expand(t, b, slots, scales.double(), y)
    with pytest.raises(ValueError, match="y's rows must be contiguous"):
        KERNELS.lora_expand(t, b, slots, scales, torch.zeros(32, 2, device=DEVICE).T)
