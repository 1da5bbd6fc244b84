"""Triton matmuls of activations by GGUF-quantized weights that stay compressed: y = x @ W^T.

W is a `PackedQuantWeight` (`quant_pack`: the GGUF blocks split into planes, same byte count),
decoded tile by tile in registers by `quant_decode`, never materialised.

Decode (M <= GEMV_MAX_M) is memory bound. `_gemv_kernel` streams each weight row once: a thread
holds the same VEC-byte slice (VEC = 16 bytes / x's element size) of one 16-byte group in each
of BLOCK_N rows, consecutive lanes on consecutive slices, and loads the VEC matching values of x
once for all those rows, so x, scales and quants share one register layout. It accumulates in
fp32 on CUDA cores, applies each scale once per slice, and can split K over programs, whose
partial sums a second pass adds. Prefill runs `_gemm_kernel`: each weight tile is dequantized to
x's dtype and fed to tl.dot.

The kernels never write anything but y (and split-K partials), and never synchronise with the
host. Under TRITON_INTERPRET=1 they run on CPU tensors, which is how the tests exercise them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from lumen.engine.triton_kernels.quant_decode import accumulate
from lumen.engine.triton_kernels.quant_pack import LAYOUTS, Layout, PackedQuantWeight, layout_of, pack, supported

__all__ = ["GEMV_MAX_M", "PackedQuantWeight", "pack", "quant_matmul", "supported"]

GEMV_MAX_M = 4             # above this many rows of x, the tensor-core GEMM wins
PTX_DECODE = True          # GEMV on CUDA: unpack 4 quant bytes a register with inline PTX (quant_decode._magic)
MAX_PLANES = 5


@triton.jit
def _gemv_kernel(
        x_ptr,            # [M, K] fp16/bf16/fp32, rows stride_xm apart
        out_ptr,          # [M, N] x's dtype: written when SPLIT_K == 1
        part_ptr,         # [SPLIT_K, M, N] fp32: each split's partial sums when SPLIT_K > 1
        p0, p1, p2, p3, p4,   # the weight's planes [N, ...] (quant_pack), unused ones repeat p0
        s0, s1, s2, s3, s4,   # their row strides, in elements
        M, N, K, stride_xm, stride_om, n_groups, tiles_per_split,
        QTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, SPLIT_K: tl.constexpr,
        MASK: tl.constexpr, VEC: tl.constexpr, PTX: tl.constexpr):
    m = tl.program_id(0)          # fastest: the rows of x that share a weight tile run together
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)     # clamped, not masked: only the store is
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_N, BLOCK_G, 16 // VEC], dtype=tl.float32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(n_groups, BLOCK_G))
    for t in range(first, last):
        g = t * BLOCK_G + tl.arange(0, BLOCK_G)
        acc = accumulate(QTYPE, acc, p0, p1, p2, p3, p4, s0, s1, s2, s3, s4, rows, g, g < n_groups, x_row, K,
                         False, MASK, False, VEC, PTX)
    y = tl.sum(tl.sum(acc, 2), 1)                                               # [BLOCK_N]
    if SPLIT_K == 1:
        tl.store(out_ptr + m * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=offs_n < N)
    else:
        tl.store(part_ptr + (split * M + m) * N + offs_n, y, mask=offs_n < N)


@triton.jit
def _split_sum_kernel(
        part_ptr,         # [SPLIT_K, M, N] fp32
        out_ptr,          # [M, N]
        M, N, stride_om, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + (s * M + m) * N + offs, mask=mask, other=0.0)
    tl.store(out_ptr + m * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_kernel(
        x_ptr,            # [M, K] fp16/bf16/fp32, rows stride_xm apart
        out_ptr,          # [M, N] x's dtype, rows stride_om apart
        p0, p1, p2, p3, p4,   # the weight's planes, as in _gemv_kernel
        s0, s1, s2, s3, s4,
        M, N, K, stride_xm, stride_om, n_groups,
        QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
        MASK: tl.constexpr, DOT_FP32: tl.constexpr):
    pid_m = tl.program_id(0)      # fastest: the M tiles of one weight tile share it through L2
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = x_ptr + tl.minimum(offs_m, M - 1).to(tl.int64) * stride_xm          # [BLOCK_M]
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)                       # y^T tile
    for t in range(0, tl.cdiv(n_groups, BLOCK_G)):
        g = t * BLOCK_G + tl.arange(0, BLOCK_G)
        acc = accumulate(QTYPE, acc, p0, p1, p2, p3, p4, s0, s1, s2, s3, s4, rows, g, g < n_groups, x_rows, K,
                         True, MASK, DOT_FP32, 16, False)
    out = out_ptr + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[None, :] & (offs_n < N)[:, None])


INTERPRETED = isinstance(_gemm_kernel, InterpretedFunction)   # TRITON_INTERPRET=1 at import time


def quant_matmul(x: torch.Tensor, weight: PackedQuantWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (fp16, bf16 or fp32) @ W^T for a packed W [N, K] -> [M, N] in x's dtype.

    Accumulates in fp32. The GEMV (M <= GEMV_MAX_M) multiplies in fp32 too; the GEMM rounds each
    dequantized weight to x's dtype for the tensor cores (fp32 x: an fp32 dot). `out`, when
    given, must be [M, N] of x's dtype with contiguous rows.
    """
    lay = _check_inputs(x, weight, out)
    m, n, k = x.shape[0], weight.n, weight.k
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    planes = list(weight.planes) + [weight.planes[0]] * (MAX_PLANES - len(weight.planes))
    strides = [p.stride(0) for p in weight.planes] + [0] * (MAX_PLANES - len(weight.planes))
    n_groups = k // lay.group
    if m <= GEMV_MAX_M:
        _launch_gemv(x, out, lay, planes, strides, n, k, n_groups)
    else:
        _launch_gemm(x, out, lay, planes, strides, n, k, n_groups)
    return out


def gemv_plan(lay: Layout, n: int, k: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_N, BLOCK_G, num_warps, num_stages, SPLIT_K, tiles per split) of the GEMV for an
    [n, k] weight (bench/quant_gemv_sass.py compiles the kernel with the same plan)."""
    block_n, block_k, num_warps, num_stages, split_k = _gemv_config(lay.type_id, n, k)
    block_g = _groups_per_tile(lay, block_k)
    tiles = triton.cdiv(k // lay.group, block_g)
    per_split = triton.cdiv(tiles, max(1, min(split_k, tiles)))
    split_k = triton.cdiv(tiles, per_split)            # no split is left without a tile
    return block_n, block_g, num_warps, num_stages, split_k, per_split


def _launch_gemv(x, out, lay: Layout, planes, strides, n: int, k: int, n_groups: int) -> None:
    m = x.shape[0]
    block_n, block_g, num_warps, num_stages, split_k, per_split = gemv_plan(lay, n, k)
    part = torch.empty((split_k, m, n) if split_k > 1 else (1,), dtype=torch.float32, device=x.device)
    _gemv_kernel[(m, triton.cdiv(n, block_n), split_k)](
        x, out, part, *planes, *strides, m, n, k, x.stride(0), out.stride(0), n_groups, per_split,
        QTYPE=lay.type_id, BLOCK_N=block_n, BLOCK_G=block_g, SPLIT_K=split_k,
        MASK=n_groups % block_g != 0, VEC=16 // x.element_size(), PTX=_ptx_decode(x), num_warps=num_warps,
        num_stages=num_stages)
    if split_k > 1:
        block = min(1024, triton.next_power_of_2(n))
        _split_sum_kernel[(m, triton.cdiv(n, block))](part, out, m, n, out.stride(0), SPLIT_K=split_k,
                                                      BLOCK=block, num_warps=4)


def _launch_gemm(x, out, lay: Layout, planes, strides, n: int, k: int, n_groups: int) -> None:
    m = x.shape[0]
    block_m, block_n, block_k, num_warps, num_stages = _gemm_config(lay.type_id, m, n, k)
    block_g = _groups_per_tile(lay, block_k)
    assert block_m >= 16 and block_n >= 16 and block_g * 16 >= 16, "tl.dot needs every tile dimension >= 16"
    _gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        x, out, *planes, *strides, m, n, k, x.stride(0), out.stride(0), n_groups,
        QTYPE=lay.type_id, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_G=block_g,
        MASK=n_groups % block_g != 0, DOT_FP32=_compute_fp32(x.dtype), num_warps=num_warps,
        num_stages=num_stages)


def _groups_per_tile(lay: Layout, block_k: int) -> int:
    block_g = block_k // lay.group
    assert block_g >= 1 and block_k % lay.group == 0 and block_g & (block_g - 1) == 0, \
        f"BLOCK_K={block_k} must be a power-of-two multiple of {lay.name}'s {lay.group}-value group"
    return block_g


def _check_inputs(x: torch.Tensor, weight: PackedQuantWeight, out: torch.Tensor | None) -> Layout:
    """Assert what the kernels rely on; return the weight's layout."""
    assert isinstance(weight, PackedQuantWeight), \
        f"weight must be a PackedQuantWeight (quant_matmul.pack), got {type(weight).__name__}"
    lay = layout_of(weight.qtype)
    assert x.dim() == 2, f"x must be [M, K], got shape {tuple(x.shape)}"
    assert x.shape[1] == weight.k, \
        f"x has K={x.shape[1]} input features but the {lay.name} weight [{weight.n}, {weight.k}] has K={weight.k}"
    assert weight.k % lay.block_size == 0, \
        f"K={weight.k} is not a multiple of {lay.name}'s block size {lay.block_size}"
    assert len(weight.planes) <= MAX_PLANES and all(p.shape[0] == weight.n for p in weight.planes), \
        f"the {lay.name} planes do not have {weight.n} rows each; build the weight with pack()"
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), \
        f"x must be float16, bfloat16 or float32, got {x.dtype}"
    assert x.stride(1) == 1, "x's rows must be contiguous (x.stride(1) == 1)"
    assert x.device == weight.device, f"x is on {x.device} but the weight on {weight.device}"
    assert x.is_cuda or INTERPRETED, "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 set before import)"
    if out is not None:
        assert out.shape == (x.shape[0], weight.n) and out.dtype == x.dtype and out.device == x.device, \
            f"out must be [{x.shape[0]}, {weight.n}] {x.dtype} on {x.device}, got {tuple(out.shape)} {out.dtype}"
        assert out.stride(1) == 1, "out's rows must be contiguous (out.stride(1) == 1)"
    return lay


def _ptx_decode(x: torch.Tensor) -> bool:
    return PTX_DECODE and x.is_cuda and not INTERPRETED and torch.version.hip is None


def _compute_fp32(dtype: torch.dtype) -> bool:
    # The interpreter's bf16 arithmetic is wrong, so there bf16 is upcast right after loading.
    return dtype == torch.float32 or (INTERPRETED and dtype == torch.bfloat16)


def _gemv_config(qtype: int, n: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K) of the GEMV; BLOCK_K counts K values."""
    lay = LAYOUTS[qtype]
    if INTERPRETED:   # interpreted cost is per operation, not per element: few, large tiles
        # (512 rows x 128 groups x 16 bytes is Triton's largest tensor, 2^20 elements.)
        return min(512, triton.next_power_of_2(n)), lay.group * min(128, triton.next_power_of_2(k // lay.group)), 4, 1, 1
    # 64 groups over 4 warps: a warp spans 16 groups (256 contiguous bytes of each plane) of every
    # row, so x and the scales come in the quant tile's own layout, and each thread has BLOCK_N
    # rows of loads in flight. More rows than this costs registers (occupancy) faster than it
    # adds bytes in flight; types with over 24 bytes a group (Q3_K, Q6_K) keep two.
    rows = 4 if lay.type_size * lay.group <= 24 * lay.block_size else 2
    return rows, 64 * lay.group, 4, 1, 1


def _gemm_config(qtype: int, m: int, n: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the GEMM; BLOCK_K counts K values."""
    lay = LAYOUTS[qtype]
    if INTERPRETED:
        block_k = lay.group * min(32, triton.next_power_of_2(k // lay.group))
        return min(64, max(16, triton.next_power_of_2(m))), min(512, max(16, triton.next_power_of_2(n))), block_k, 4, 1
    block_k = max(128, 2 * lay.group)
    if m <= 16:
        return 16, 64, 2 * block_k, 4, 3
    if m <= 64:
        return 64, 64, block_k, 4, 3
    return 128, 128, block_k, 8, 3

