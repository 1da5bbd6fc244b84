"""quant_matmul against x.double() @ dequantize(raw).double().T for every packed GGUF type.

Weights are random blocks with finite fp16 scales (zero, subnormal, large, ordinary); for
half-precision x the scales stay small enough that y fits in fp16. Every run draws fresh
inputs; a failure prints the seed that rebuilds them (SEED=... to replay). Outputs are
poisoned with NaN first, so an element no program writes fails the test. Without CUDA the
kernels run under TRITON_INTERPRET=1 on CPU tensors, on small shapes.
"""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from lumen.engine.weights.quant import QUANT_TYPES, dequantize
from tests.engine.triton_kernels import DEVICE, import_kernels
from tests.engine.weights.quant.blocks import random_blocks

KERNELS, NO_TRITON = import_kernels("quant_matmul", "quantized matmul")
pytestmark = pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")

TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
# Relative error bounds ||out - ref|| / ||ref||: fp32 accumulates exactly-decoded weights; fp16 and
# bf16 round y (and, in the GEMM, the dequantized weights) to 11 and 8 significant bits.
REL_ERR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
HALF_MAX_EXP = 10   # fp16 scales below 2^-4: |weights| < 512, so y stays far from 65504


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("SEED", "0")) or random.SystemRandom().randrange(1, 2**31)


def make_weight(qtype: T, n: int, blocks_per_row: int, seed: int, dtype: torch.dtype):
    """(raw bytes [n, row bytes] on the CPU, packed weight on DEVICE, reference float64 [n, k])."""
    rng = np.random.default_rng([seed, int(qtype)])
    max_exp = 30 if dtype == torch.float32 else HALF_MAX_EXP
    raw = random_blocks(qtype, rng, n * blocks_per_row, max_exp).reshape(n, -1)
    k = blocks_per_row * QUANT_TYPES[qtype].block_size
    ref = dequantize(torch.from_numpy(raw), qtype, (n, k)).double()
    return raw, KERNELS.pack(raw, qtype, n, k, DEVICE), ref


def odd_rows(r: random.Random) -> int:
    """A row count that is not a power of two (and not a multiple of 16)."""
    return r.choice([n for n in range(33, 80) if n & (n - 1) and n % 16])


def blocks_per_row(qtype: T, r: random.Random) -> int:
    """K / block_size: a non-power-of-two K (15 * 32 = 480, 3 * 256 = 768, ...)."""
    return r.choice([13, 15]) if QUANT_TYPES[qtype].block_size == 32 else r.choice([3, 5])


def check(qtype: T, m: int, n: int, nb: int, dtype: torch.dtype, seed: int, what: str) -> None:
    _, packed, w = make_weight(qtype, n, nb, seed, dtype)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((m, packed.k), generator=gen).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    y = KERNELS.quant_matmul(x.to(DEVICE), packed, out=out)
    assert y is out and y.dtype == dtype
    ref = x.double() @ w.T
    got = y.cpu().double()
    unwritten = int(torch.isnan(got).sum())
    assert unwritten == 0, f"{what}: {unwritten} of {m * n} outputs are NaN (unwritten?); replay with SEED={seed}"
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < REL_ERR[dtype], (f"{what}: relative error {err:.3g} >= {REL_ERR[dtype]} for M={m} N={n} "
                                  f"K={packed.k} {dtype}; replay with SEED={seed}")


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("m", [1, 3, 19], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matches_reference(qtype: T, dtype: torch.dtype, m: int, seed: int) -> None:
    """M = 1 and 3 take the GEMV, M = 19 the GEMM (a partial M tile); N and K are not powers of two."""
    r = random.Random(seed)
    path = "GEMV" if m <= KERNELS.GEMV_MAX_M else "GEMM"
    check(qtype, m, odd_rows(r), blocks_per_row(qtype, r), dtype, seed, f"{qtype.name} {path}")


@pytest.mark.parametrize("even", [False, True], ids=["masked-tail", "even"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_small_tiles_and_split_k(qtype: T, even: bool, seed: int, monkeypatch) -> None:
    """Several N tiles, several K tiles (with or without a partial last one) and split-K partial sums."""
    group = KERNELS.LAYOUTS[int(qtype)].group
    groups_per_tile = 4 if even else 16
    monkeypatch.setattr(KERNELS, "_gemv_config", lambda *_: (16, groups_per_tile * group, 4, 1, 3))
    monkeypatch.setattr(KERNELS, "_gemm_config", lambda *_: (16, 16, groups_per_tile * group, 4, 1))
    legacy = QUANT_TYPES[qtype].block_size == 32
    nb = (8 if even else 13) if legacy else (2 if even else 3)
    n_groups = nb * QUANT_TYPES[qtype].block_size // group
    assert (n_groups % groups_per_tile == 0) == even
    n = odd_rows(random.Random(seed))
    check(qtype, 2, n, nb, torch.float32, seed, f"{qtype.name} GEMV, {groups_per_tile} groups a tile, split-K")
    check(qtype, 20, n, nb, torch.float16, seed, f"{qtype.name} GEMM, 16x16 tiles, {groups_per_tile} groups a tile")


@pytest.mark.parametrize("m", [2, 7], ids=["GEMV", "GEMM"])
def test_strided_rows_of_x_and_out(m: int, seed: int) -> None:
    """x and out may be views whose rows lie further apart than K and N (slices of wider tensors);
    nothing outside out's columns is written."""
    _, packed, w = make_weight(T.Q6_K, 40, 2, seed, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    wide_x = torch.randn((m, packed.k + 48), generator=gen).to(DEVICE)
    wide_out = torch.full((m, 40 + 24), float("nan"), device=DEVICE)
    y = KERNELS.quant_matmul(wide_x[:, 16:16 + packed.k], packed, out=wide_out[:, 8:48])
    ref = wide_x[:, 16:16 + packed.k].cpu().double() @ w.T
    err = ((y.cpu().double() - ref).norm() / ref.norm()).item()
    assert err < REL_ERR[torch.float32], f"relative error {err:.3g}; replay with SEED={seed}"
    assert torch.isnan(wide_out[:, :8]).all() and torch.isnan(wide_out[:, 48:]).all(), "wrote outside out"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_packed_weight_is_no_larger_than_gguf(qtype: T, seed: int) -> None:
    raw, packed, _ = make_weight(qtype, 3, 2, seed, torch.float32)
    assert KERNELS.supported(qtype) and KERNELS.supported(int(qtype))
    assert packed.nbytes == raw.nbytes
    assert all(p.is_contiguous() and p.shape[0] == 3 and p.device.type == DEVICE.type for p in packed.planes)


def test_bad_inputs_raise_clear_errors(seed: int) -> None:
    raw, packed, _ = make_weight(T.Q4_0, 8, 2, seed, torch.float32)     # K = 64
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(AssertionError, match="K=48 input features"):
        KERNELS.quant_matmul(x[:, :48], packed)
    with pytest.raises(AssertionError, match="float16, bfloat16 or float32"):
        KERNELS.quant_matmul(x.double(), packed)
    with pytest.raises(AssertionError, match=r"must be \[M, K\]"):
        KERNELS.quant_matmul(x[0], packed)
    with pytest.raises(AssertionError, match="rows must be contiguous"):
        KERNELS.quant_matmul(torch.randn(64, 2, device=DEVICE).T, packed)
    with pytest.raises(AssertionError, match=r"out must be \[2, 8\]"):
        KERNELS.quant_matmul(x, packed, out=torch.empty(2, 8, dtype=torch.float16, device=DEVICE))
    assert not KERNELS.supported(T.IQ4_NL) and not KERNELS.supported(T.F16)
    with pytest.raises(ValueError, match="IQ4_NL has no quantized matmul kernel"):
        KERNELS.pack(raw, T.IQ4_NL, 8, 64)
    with pytest.raises(ValueError, match="multiple of 32 values, got k=48"):
        KERNELS.pack(raw, T.Q4_0, 8, 48)
    with pytest.raises(ValueError, match="needs 144 bytes, got 288"):
        KERNELS.pack(raw, T.Q4_0, 4, 64)
    with pytest.raises(ValueError, match="must be uint8 bytes"):
        KERNELS.pack(torch.from_numpy(raw).int(), T.Q4_0, 8, 64)


def run_ptx(asm: str, a: int, b: int) -> list[int]:
    """A tiny interpreter for the PTX subset of quant_decode's `_magic`: outputs $0..$3 for inputs $4, $5."""
    regs = {"$4": a, "$5": b}
    value = lambda op: regs[op] if op in regs else int(op, 0)        # noqa: E731
    ops = {"and": lambda x, y: x & y, "or": lambda x, y: x | y, "xor": lambda x, y: x ^ y,
           "shl": lambda x, y: (x << y) & 0xFFFFFFFF, "shr": lambda x, y: x >> y}
    for instr in asm.strip("{} ").split(";"):
        if not instr.strip() or instr.strip().startswith(".reg"):
            continue
        name, args = instr.split(None, 1)
        dst, *src = [s.strip() for s in args.split(",")]
        name = name.split(".")[0]
        if name == "mov":
            regs[dst] = value(src[0])
        elif name == "prmt":                            # default mode: byte i <- selector nibble i of (b:a)
            pool = value(src[0]) | value(src[1]) << 32
            sel = value(src[2])
            regs[dst] = sum(((pool >> 8 * ((sel >> 4 * i) & 7)) & 0xFF) << 8 * i for i in range(4))
        else:
            regs[dst] = ops[name](value(src[0]), value(src[1]))
    return [regs[f"${i}"] for i in range(4)]


PTX_CASES = {   # name -> what each output byte of `_magic` must hold, from bytes a (and b) of the inputs
    "PTX_LO": lambda a, b: a & 15, "PTX_HI": lambda a, b: a >> 4, "PTX_XOR": lambda a, b: a ^ 0x80,
    "PTX_Q6_0": lambda a, b: (a & 15) | (b & 3) << 4, "PTX_Q6_1": lambda a, b: (a & 15) | (b >> 2 & 3) << 4,
    "PTX_Q6_2": lambda a, b: (a >> 4) | (b >> 4 & 3) << 4, "PTX_Q6_3": lambda a, b: (a >> 4) | (b >> 6) << 4,
}


@pytest.mark.parametrize("name", list(PTX_CASES))
def test_inline_ptx_decodes_like_the_triton_path(name: str, seed: int) -> None:
    """The GEMV's inline PTX (CUDA only, so the interpreter never runs it) against its plain formula:
    each output must be the float 2^23 + v for the v of the byte in the same position."""
    from lumen.engine.triton_kernels import quant_decode
    asm = getattr(quant_decode, name).value
    r = random.Random(seed)
    for _ in range(200):
        a, b = [r.randrange(256) for _ in range(4)], [r.randrange(256) for _ in range(4)]
        out = run_ptx(asm, int.from_bytes(bytes(a), "little"), int.from_bytes(bytes(b), "little"))
        want = [0x4B000000 | PTX_CASES[name](x, y) for x, y in zip(a, b)]
        assert out == want, f"{name} on bytes {a}, {b}: {[hex(o) for o in out]} != {[hex(w) for w in want]}"
