"""Triton kernels that apply a batch of LoRA adapters, a different one (or none) per row (BGMV).

Punica/vLLM style: each row gathers its own adapter through `slots`, so one launch serves a batch
that mixes adapters. The delta is two skinny matmuls, shrink then expand:

    t[i]  = x[i] @ A[slots[i]]^T                    # [m, r]  fp32 (lora_shrink)
    y[i] += scales[i] * (t[i] @ B[slots[i]]^T)       # [m, n]  in place (lora_expand)

Rows whose slot is -1 use no adapter: shrink writes zeros, expand leaves them alone. Everything is
multiplied and summed in fp32 on CUDA cores (r is 1..256: too skinny for tensor cores to pay),
which also keeps the interpreter's broken bf16 arithmetic out of the way. Slots are not checked
against the number of adapters on the device: a slot >= n_adapters reads out of bounds.

The kernels never write anything but t and y's own columns, and never synchronise with the host.
Under TRITON_INTERPRET=1 they run on CPU tensors, which is how the tests exercise them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = ["lora_expand", "lora_expand_reference", "lora_shrink", "lora_shrink_reference"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SLOT_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _shrink_kernel(
        x_ptr,            # [M, K] fp32/bf16/fp16, rows stride_xm apart
        a_ptr,            # [n_adapters, R, K] any float dtype, K contiguous
        slots_ptr,        # [M] int32/int64: each row's adapter, -1 for none
        t_ptr,            # [M, R] fp32, rows stride_tm apart
        R, K, stride_xm, stride_aa, stride_ar, stride_tm,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    t_row = t_ptr + row.to(tl.int64) * stride_tm
    slot = tl.load(slots_ptr + row).to(tl.int64)
    if slot < 0:
        # t comes from torch.empty: writing zeros here spares a memset launch.
        tl.store(t_row + offs_r, tl.zeros([BLOCK_R], dtype=tl.float32), mask=r_ok)
        return
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    a_rows = a_ptr + slot * stride_aa + offs_r.to(tl.int64)[:, None] * stride_ar      # [BLOCK_R, 1]
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)     # reduced over K once, after the loop
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        xs = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)                                # [BLOCK_K]
        a = tl.load(a_rows + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += a * xs[None, :]
    tl.store(t_row + offs_r, tl.sum(acc, 1), mask=r_ok)


@triton.jit
def _expand_kernel(
        t_ptr,            # [M, R] fp32, rows stride_tm apart
        b_ptr,            # [n_adapters, N, R] any float dtype, R contiguous
        slots_ptr,        # [M] int32/int64: each row's adapter, -1 for none
        scales_ptr,       # [M] fp32
        y_ptr,            # [M, N] fp32/bf16/fp16, rows stride_ym apart (may be a column slice)
        N, R, stride_tm, stride_ba, stride_bn, stride_ym,
        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    if slot < 0:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    t_row = t_ptr + row.to(tl.int64) * stride_tm
    b_rows = b_ptr + slot * stride_ba + offs_n.to(tl.int64)[:, None] * stride_bn      # [BLOCK_N, 1]
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):     # one trip when BLOCK_R covers r (always, interpreted)
        r = r0 + offs_r
        r_ok = r < R
        t = tl.load(t_row + r, mask=r_ok, other=0.0)                                                 # [BLOCK_R]
        b = tl.load(b_rows + r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(b * t[None, :], 1)
    scale = tl.load(scales_ptr + row)
    y_at = y_ptr + row.to(tl.int64) * stride_ym + offs_n
    y = tl.load(y_at, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_at, (y + scale * acc).to(y_ptr.dtype.element_ty), mask=n_ok)


INTERPRETED = isinstance(_shrink_kernel, InterpretedFunction)   # TRITON_INTERPRET=1 at import time


def lora_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """t[i] = x[i] @ a[slots[i]].T for rows with slots[i] >= 0; rows with slot -1 are zero.

    x: [m, k] float32/bfloat16/float16 (rows contiguous: stride(1) == 1, any row stride);
    a: [n_adapters, r, k] (any float dtype, contiguous); slots: [m] int32 or int64 on x's device.
    Returns t: [m, r] float32. Bad shapes, dtypes or devices raise ValueError.
    """
    _check_shrink(x, a, slots)
    m, k = x.shape
    r = a.shape[1]
    t = torch.empty((m, r), dtype=torch.float32, device=x.device)
    if m == 0 or r == 0:
        return t
    if k == 0:
        return t.zero_()
    block_r, block_k, num_warps = _shrink_config(r, k)
    _shrink_kernel[(m, triton.cdiv(r, block_r))](
        x, a, slots, t, r, k, x.stride(0), a.stride(0), a.stride(1), t.stride(0),
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps)
    return t


def lora_expand(t: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor,
                y: torch.Tensor) -> None:
    """y[i] += scales[i] * (t[i] @ b[slots[i]].T) for rows with slots[i] >= 0, in place; other rows untouched.

    t: [m, r] float32; b: [n_adapters, n, r] (any float dtype, contiguous); scales: [m] float32;
    y: [m, n] float32/bfloat16/float16 with stride(1) == 1 (a column slice of a wider tensor is
    fine). The sum is formed in fp32 and rounded once to y's dtype. Bad inputs raise ValueError.
    """
    _check_expand(t, b, slots, scales, y)
    m, n = y.shape
    r = t.shape[1]
    if m == 0 or n == 0 or r == 0:
        return
    block_n, block_r, num_warps = _expand_config(n, r)
    _expand_kernel[(m, triton.cdiv(n, block_n))](
        t, b, slots, scales, y, n, r, t.stride(0), b.stride(0), b.stride(1), y.stride(0),
        BLOCK_N=block_n, BLOCK_R=block_r, num_warps=num_warps)


def lora_shrink_reference(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """lora_shrink in float64 with plain torch ops (slow, obviously right)."""
    t = torch.zeros((x.shape[0], a.shape[1]), dtype=torch.float64, device=x.device)
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            t[i] = a[slot].double() @ x[i].double()
    return t.float()


def lora_expand_reference(t: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor,
                          y: torch.Tensor) -> None:
    """lora_expand in float64 with plain torch ops (slow, obviously right), in place on y."""
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            delta = scales[i].double() * (b[slot].double() @ t[i].double())
            y[i] = (y[i].double() + delta).to(y.dtype)


def _shrink_config(r: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_K, num_warps) of the shrink."""
    if INTERPRETED:   # interpreted cost is per operation, not per element: few, large tiles
        return triton.next_power_of_2(r), min(1024, triton.next_power_of_2(k)), 4
    # A [16, 256] fp32 accumulator is 32 registers a thread over 4 warps; K-contiguous loads of 16 bytes.
    return min(16, triton.next_power_of_2(r)), min(256, max(32, triton.next_power_of_2(k))), 4


def _expand_config(n: int, r: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_R, num_warps) of the expand."""
    if INTERPRETED:
        return min(1024, triton.next_power_of_2(n)), triton.next_power_of_2(r), 4
    # 64 columns of y a program: a 4096-wide y gives 64 programs a row even when decoding one token.
    return min(64, max(16, triton.next_power_of_2(n))), min(64, triton.next_power_of_2(r)), 4


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_slots(slots: torch.Tensor, m: int, device: torch.device) -> None:
    _require(slots.dim() == 1 and slots.shape[0] == m, f"slots must be [{m}], got shape {tuple(slots.shape)}")
    _require(slots.dtype in SLOT_DTYPES, f"slots must be int32 or int64, got {slots.dtype}")
    _require(slots.device == device, f"slots is on {slots.device} but the activations on {device}")
    _require(slots.stride(0) == 1 or m <= 1, "slots must be contiguous")
    _require(device.type == "cuda" or INTERPRETED,
             "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 set before import)")


def _check_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> None:
    _require(x.dim() == 2, f"x must be [m, k], got shape {tuple(x.shape)}")
    _require(a.dim() == 3, f"a must be [n_adapters, r, k], got shape {tuple(a.shape)}")
    _require(x.shape[1] == a.shape[2],
             f"x has k={x.shape[1]} input features but the adapters a {list(a.shape)} have k={a.shape[2]}")
    _require(x.dtype in FLOAT_DTYPES, f"x must be float32, bfloat16 or float16, got {x.dtype}")
    _require(a.dtype.is_floating_point, f"a must be a float tensor, got {a.dtype}")
    _require(x.stride(1) == 1 or x.shape[1] <= 1, "x's rows must be contiguous (x.stride(1) == 1)")
    _require(a.is_contiguous(), "a must be contiguous")
    _require(a.device == x.device, f"x is on {x.device} but a on {a.device}")
    _check_slots(slots, x.shape[0], x.device)


def _check_expand(t: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor,
                  y: torch.Tensor) -> None:
    _require(b.dim() == 3, f"b must be [n_adapters, n, r], got shape {tuple(b.shape)}")
    _require(t.dim() == 2 and t.dtype == torch.float32,
             f"t must be a float32 [m, r] (lora_shrink's output), got {t.dtype} of shape {tuple(t.shape)}")
    _require(t.shape[1] == b.shape[2],
             f"t has width {t.shape[1]} but the adapters b {list(b.shape)} have rank r={b.shape[2]}")
    m, n = t.shape[0], b.shape[1]
    _require(tuple(y.shape) == (m, n), f"y must be [m, n] = [{m}, {n}], got shape {tuple(y.shape)}")
    _require(y.dtype in FLOAT_DTYPES, f"y must be float32, bfloat16 or float16, got {y.dtype}")
    _require(b.dtype.is_floating_point, f"b must be a float tensor, got {b.dtype}")
    _require(scales.dim() == 1 and scales.shape[0] == m and scales.dtype == torch.float32,
             f"scales must be a float32 [{m}], got {scales.dtype} of shape {tuple(scales.shape)}")
    _require(y.stride(1) == 1 or n <= 1, "y's rows must be contiguous (y.stride(1) == 1)")
    _require(t.stride(1) == 1 or t.shape[1] <= 1, "t's rows must be contiguous (t.stride(1) == 1)")
    _require(b.is_contiguous(), "b must be contiguous")
    _require(scales.stride(0) == 1 or m <= 1, "scales must be contiguous")
    for name, other in (("t", t), ("b", b), ("scales", scales)):
        _require(other.device == y.device, f"y is on {y.device} but {name} on {other.device}")
    _check_slots(slots, m, y.device)
