"""Linear layers as objects the model calls: how a weight is stored decides how it is multiplied.

`DenseLinear` is plain `F.linear` (device weights, and CPU weights in other dtypes). Float32
matrices on the CPU run in the C kernels as GGUF F32 rows (`float32_linear`; `PaddedFloatLinear`
for row lengths that are not whole 32-value blocks), which keeps them batch invariant as torch's
GEMMs are not. `OneDNNLinear`, a float32 weight prepacked for oneDNN, is their path where there
are no C kernels: its GEMM stays efficient for the small batches of decode steps (against MKL's:
BENCHMARKS.md).

GGUF weights stay in their file's blocks (`GGUFWeight`: the file's bytes, read once into
huge-page memory by `weights.resident`; never a float copy). `NativeQuantLinear` multiplies
by them with the C kernels of `native` (decoded a block at a time inside the matmul,
batch invariant);
`ChunkedQuantLinear` is the general path for types those kernels lack, or for machines
without a C compiler: it decodes a few rows at a time into a small buffer with
`weights.quant`. `ConcatLinear` runs several weights as one (q/k/v, gate/up) without
concatenating them, since their types may differ and a concatenation would be a copy.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lumen.engine.native import kernels as native
from lumen.engine.weights.quant import dequantize

log = logging.getLogger(__name__)

# Batch size the packed layout is tuned for: measured best for both 1 and 16 rows (BENCHMARKS.md).
PACK_BATCH_HINT = 4
# Below this many weights oneDNN's per-call overhead outweighs its faster GEMM (stories260K's
# 64x64 matrices: BENCHMARKS.md); such layers stay dense.
PACK_MIN_WEIGHTS = 1 << 20


class DenseLinear:
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight  # [out, in]
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class OneDNNLinear:
    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


@dataclass(frozen=True, slots=True)
class GGUFWeight:
    """A weight matrix as GGUF blocks: `raw` uint8 [out_features, bytes_per_row], row n = output n."""

    raw: torch.Tensor
    qtype: int
    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def decode_rows(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """The given rows as float32 [len(rows), in_features]."""
        raw = self.raw[rows]
        return dequantize(raw, self.qtype, (raw.shape[0], self.in_features))


class _BlockLinear(ABC):
    """A linear over a GGUFWeight; subclasses say how `matmul_into` multiplies."""

    def __init__(self, weight: GGUFWeight) -> None:
        self.weight = weight
        self.out_features, self.in_features = weight.out_features, weight.in_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.dtype == torch.float32:      # the decode path: no reshapes or casts
            y = torch.empty((x.shape[0], self.out_features), dtype=torch.float32)
            self.matmul_into(x, y)
            return y
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = torch.empty((x2.shape[0], self.out_features), dtype=torch.float32)
        self.matmul_into(x2, y)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    @abstractmethod
    def matmul_into(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y (float32 [m, out], rows contiguous; may be a column slice) = x @ W^T."""


_layout_changes = 0


def layout_changes() -> int:
    """How many times a NativeQuantLinear has rearranged its weight in place so far: C structs
    that hold a weight's address and type (lumen.engine.model.llama's fused layers) are rebuilt
    when this moves."""
    return _layout_changes


class NativeQuantLinear(_BlockLinear):
    """x @ W^T with W kept as GGUF blocks, by the C kernels: in the exact mode (float32 arithmetic
    on the exactly decoded weights) or, with `int8` set, the int8 mode (8-bit activations and
    integer dot products, lumen.engine.native.kernels.MATMUL_MODES).

    With `interleave` also set (a weight this linear alone holds: not a tied embedding), a Q4_0
    or Q4_1 weight is rearranged in place, at its first int8 matmul, into the layout whose
    kernels compute 8 outputs a vector register (kernels.X8: the same bits, no second copy), and
    `weight` then has that layout's type, so that nothing reads it as the file's. Leaving the int8
    mode, or `file_layout()`, puts the file's layout back."""

    interleave = False

    def __init__(self, weight: GGUFWeight) -> None:
        super().__init__(weight)
        raw = weight.raw
        assert raw.dtype == torch.uint8 and raw.dim() == 2 and raw.stride() == (raw.shape[1], 1), \
            "GGUF rows must be contiguous uint8"
        self._raw = (raw.data_ptr(), raw.shape[1])   # checked once: every call reuses them
        self._int8 = False

    @property
    def int8(self) -> bool:
        return self._int8

    @int8.setter
    def int8(self, on: bool) -> None:
        if not on:
            self.file_layout()
        self._int8 = bool(on)

    def _relayout(self, to_x8: bool) -> None:
        global _layout_changes
        w = self.weight
        base = w.qtype if to_x8 else native.X8_BASE[w.qtype]
        native.interleave(w.raw, base, w.in_features, to_x8)
        self.weight = GGUFWeight(w.raw, native.X8[base] if to_x8 else base, w.out_features, w.in_features)
        _layout_changes += 1

    def file_layout(self) -> GGUFWeight:
        """The weight in its file's layout (rearranged back if it was interleaved)."""
        if self.weight.qtype in native.X8_BASE:
            self._relayout(False)
        return self.weight

    def prepare(self) -> None:
        """Interleave the weight now if this linear's mode and type call for it (else at its first matmul)."""
        if self._int8 and self.interleave and self.weight.qtype in native.X8 and self.out_features >= 8:
            self._relayout(True)

    def matmul_into(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y (float32 [m, out], rows contiguous; may be a column slice) = x @ W^T."""
        if self._int8 and self.interleave and self.weight.qtype in native.X8:
            self.prepare()
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        if x.shape[1] != self.in_features or y.shape != (x.shape[0], self.out_features) or y.stride(1) != 1 \
                or y.dtype != torch.float32:
            raise ValueError(f"matmul of {tuple(x.shape)} into {tuple(y.shape)} {y.dtype} over "
                             f"[{self.out_features}, {self.in_features}]")
        if x.shape[0]:
            native.qmatmul_checked_weight(self.weight.qtype, *self._raw, self.out_features, self.in_features, x, y,
                                          self._int8)


class ChunkedQuantLinear(_BlockLinear):
    """x @ W^T with W kept as GGUF blocks, decoding CHUNK_ROWS rows at a time with lumen.engine.weights.quant."""

    CHUNK_ROWS = 256

    def matmul_into(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.to(torch.float32)
        for start in range(0, self.out_features, self.CHUNK_ROWS):
            stop = min(start + self.CHUNK_ROWS, self.out_features)
            y[:, start:stop] = F.linear(x, self.weight.decode_rows(slice(start, stop)))


class ConcatLinear:
    """Several linears over the same input, their outputs side by side (one output tensor)."""


    def __init__(self, parts: list) -> None:
        self.parts = parts
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.blocks = all(hasattr(p, "matmul_into") for p in parts)
        ends = [sum(p.out_features for p in parts[:i + 1]) for i in range(len(parts))]
        self.columns = [slice(end - p.out_features, end) for p, end in zip(parts, ends)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.blocks:
            y = torch.empty((x2.shape[0], self.out_features), dtype=torch.float32)
            x32 = x2 if x2.dtype == torch.float32 and x2.is_contiguous() else x2.to(torch.float32).contiguous()
            for p, cols in zip(self.parts, self.columns):
                p.matmul_into(x32, y[:, cols])
            return y if x.dim() == 2 and x.dtype == torch.float32 else y.to(x.dtype).reshape(*lead, self.out_features)
        return torch.cat([p(x2) for p in self.parts], dim=-1).reshape(*lead, self.out_features)


@dataclass(frozen=True, slots=True)
class DenseEmbedding:
    weight: torch.Tensor   # [vocab, dim]

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


@dataclass(frozen=True, slots=True)
class QuantEmbedding:
    """Token embeddings kept as GGUF blocks; only the looked-up rows are decoded."""

    weight: GGUFWeight
    dtype: torch.dtype

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.decode_rows(ids.reshape(-1)).to(self.dtype).reshape(*ids.shape, -1)


def make_quant_linear(weight: GGUFWeight) -> NativeQuantLinear | ChunkedQuantLinear:
    """The C kernels when they handle this type and row length here, else the chunked path."""
    layout = _native_layout(weight.qtype)
    if layout is not None and weight.in_features % layout[0] == 0 and weight.in_features % 16 == 0:
        return NativeQuantLinear(weight)
    return ChunkedQuantLinear(weight)


FLOAT_QTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 30}   # GGML F32, F16, BF16
_HALF = (torch.float16, torch.bfloat16)


def float_weight(t: torch.Tensor) -> GGUFWeight:
    """A float32, float16 or bfloat16 matrix viewed as GGUF F32/F16/BF16 rows (no copy)."""
    t = t.contiguous()
    n, k = t.shape
    return GGUFWeight(t.view(torch.uint8).reshape(n, t.element_size() * k), FLOAT_QTYPES[t.dtype], n, k)


def stored_linear(parts: list[torch.Tensor], dtype: torch.dtype):
    """One linear over `parts` stacked by rows, computing in `dtype`. 16-bit weights served in
    float32 stay 16-bit (the C kernels widen them as they go) rather than doubling in size."""
    if dtype == torch.float32 and all(p.dtype in _HALF for p in parts):
        linears = [make_quant_linear(float_weight(p)) for p in parts]
        return linears[0] if len(linears) == 1 else ConcatLinear(linears)
    return make_linear((parts[0] if len(parts) == 1 else torch.cat(parts)).to(dtype))


def stored_embedding(weight: torch.Tensor, dtype: torch.dtype) -> tuple[DenseEmbedding | QuantEmbedding, object]:
    """(embedding, its tied output linear) for a [vocab, dim] matrix, kept 16-bit as stored_linear does."""
    if dtype == torch.float32 and weight.dtype in _HALF:
        w = float_weight(weight)
        return QuantEmbedding(w, dtype), make_quant_linear(w)
    dense = weight.to(dtype)
    return DenseEmbedding(dense), make_linear(dense, pack=False)


_WARNED: set[str] = set()


def _native_layout(qtype: int) -> tuple[int, int] | None:
    try:
        return native.block_layout(qtype)
    except native.NativeUnavailable as exc:
        if "native" not in _WARNED:
            _WARNED.add("native")
            log.warning("C kernels unavailable, quantized matmuls use the slower torch path: %s", exc)
        return None


def onednn_usable() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


# False while loading for another device: a oneDNN-packed weight keeps no plain copy to move there.
_PREPACK = contextvars.ContextVar("lumen_prepack_cpu", default=True)


@contextlib.contextmanager
def plain_weights():
    """Within it, make_linear keeps float32 weights plain (for weights that go to a GPU)."""
    token = _PREPACK.set(False)
    try:
        yield
    finally:
        _PREPACK.reset(token)


def make_linear(weight: torch.Tensor, pack: bool = True):
    """The kind for this weight's dtype and device: float32 on the CPU runs in the C kernels, whose
    fixed order per output keeps a request's logits the same alone or in any batch (torch's GEMMs,
    MKL's and oneDNN's, round a row differently with the batch's size, so seeded sampling parted
    at near-ties); oneDNN's prepacked GEMM where there are no C kernels, unless `pack` is False
    (a tied embedding's output matmul: never a packed second copy)."""
    if not (_PREPACK.get() and weight.dtype == torch.float32 and weight.device.type == "cpu"):
        return DenseLinear(weight)
    native_linear = float32_linear(weight)
    if native_linear is not None:
        return native_linear
    if pack and weight.numel() >= PACK_MIN_WEIGHTS and onednn_usable():
        return OneDNNLinear(weight.contiguous())
    return DenseLinear(weight)


def float32_linear(weight: torch.Tensor) -> NativeQuantLinear | PaddedFloatLinear | None:
    """A float32 CPU matrix as GGUF F32 rows for the C kernels (a view, no copy; a zero-padded copy
    when its rows are not whole blocks), or None when there are no C kernels here."""
    layout = _native_layout(FLOAT_QTYPES[torch.float32])
    if layout is None:
        return None
    if weight.shape[1] % layout[0]:
        return PaddedFloatLinear(weight, layout[0])
    return NativeQuantLinear(float_weight(weight))


class PaddedFloatLinear(_BlockLinear):
    """A float32 matrix whose row length is not a whole number of the C kernels' 32-value blocks
    (stories260K's ffn_down: 172): its rows and each input row are zero-padded to the next block.
    The padding's products are +0, so each output is the unpadded rows' sum, in one fixed order."""

    def __init__(self, weight: torch.Tensor, block: int) -> None:
        n, k = weight.shape
        padded = torch.zeros((n, -(-k // block) * block), dtype=torch.float32)
        padded[:, :k] = weight
        self.inner = NativeQuantLinear(float_weight(padded))
        super().__init__(self.inner.weight)
        self.in_features = k

    def dense(self) -> torch.Tensor:
        """The float32 matrix [out, in] (a view of the padded copy)."""
        return self.weight.raw.view(torch.float32)[:, :self.in_features]

    def matmul_into(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[1] != self.in_features:
            raise ValueError(f"matmul of {tuple(x.shape)} over [{self.out_features}, {self.in_features}]")
        xp = torch.empty((x.shape[0], self.inner.in_features), dtype=torch.float32)
        xp[:, :self.in_features] = x
        xp[:, self.in_features:] = 0.0
        self.inner.matmul_into(xp, y)
