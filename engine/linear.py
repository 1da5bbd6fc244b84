"""Linear layers as objects the model calls: how a weight is stored decides how it is multiplied.

`DenseLinear` is plain `F.linear`. `OneDNNLinear` keeps a float32 weight prepacked
for oneDNN once at load: on CPU its GEMM stays efficient for the small batches of
decode steps (measured 1.7x MKL's at 16 rows, BENCHMARKS.md), which is what makes
batching pay off in float32. The quantization issue adds quantized kinds here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Batch size the packed layout is tuned for: measured best for both 1 and 16 rows (BENCHMARKS.md).
PACK_BATCH_HINT = 4
# Below this many weights oneDNN's per-call overhead outweighs its faster GEMM (stories260K's
# 64x64 matrices ran at 0.58x the speed of F.linear); such layers stay dense.
PACK_MIN_WEIGHTS = 1 << 20


class DenseLinear:
    kind = "dense"

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight  # [out, in]
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def to(self, device: torch.device) -> "DenseLinear":
        return DenseLinear(self.weight.to(device))


class OneDNNLinear:
    kind = "onednn"

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def onednn_usable() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def make_linear(weight: torch.Tensor) -> DenseLinear | OneDNNLinear:
    """The fastest correct kind for this weight's dtype and device."""
    if (weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.numel() >= PACK_MIN_WEIGHTS
            and onednn_usable()):
        return OneDNNLinear(weight.contiguous())
    return DenseLinear(weight)
