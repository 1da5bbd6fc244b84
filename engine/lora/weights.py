"""Adapters on the device the model computes on, and what one forward step needs of them.

The model's linears come fused (q/k/v in one, gate/up in one), so an adapter is kept per
layer in the same four groups: one A [R, in] stacking its targets' A rows, and one B^T [R, out]
with each target's B in its own columns (zeros elsewhere), the scale folded in. A group then
costs two matmuls whatever it targets: shrink t = x @ A^T, expand y += s * t @ B^T.

A step (`LoraStep`) serves rows of different adapters, and rows of none, in ONE forward:
- on the CPU (torch), rows are grouped by adapter: contiguous rows (one sequence's prefill,
  or a batch that uses one adapter) as slices, others gathered and scattered back;
- on the Triton placement, every row gathers its own adapter from a stack of the loaded
  adapters (`LoraStack`, Punica/vLLM's BGMV): two kernel launches per group, whatever the mix.
Rows without an adapter are untouched; a step with no adapter row builds no LoraStep at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lumen.engine.lora.adapter import TARGETS, LoraAdapter, target_shapes
from lumen.engine.model.config import ModelConfig

# The model's fused linears and the targets each holds, in its output order.
GROUPS = {"qkv": ("attn_q", "attn_k", "attn_v"), "o": ("attn_output",), "gate_up": ("ffn_gate", "ffn_up"),
          "down": ("ffn_down",)}


@dataclass(slots=True)
class AdapterWeights:
    """One loaded adapter on the model's device: layers[i][group] = (A [R, in], B^T [R, out])."""
    name: str
    uid: int          # unique per load: a reloaded adapter never shares prefix-cache blocks with its predecessor
    rank: int
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]
    slot: int = -1    # its index in the runner's LoraStack (the Triton placement), -1 elsewhere
    native: object = None   # its layers for the C kernels' fused layers (native_layers), on the CPU

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + bt.nbytes for layer in self.layers for a, bt in layer.values())


def target_columns(cfg: ModelConfig) -> dict[str, int]:
    """Where each target's outputs start in its group's fused linear (q at 0, k after q, ...)."""
    shapes, columns = target_shapes(cfg), {}
    for targets in GROUPS.values():
        col = 0
        for t in targets:
            columns[t], col = col, col + shapes[t][0]
    return columns


def group_weights(adapter: LoraAdapter, cfg: ModelConfig, device: torch.device,
                  dtype: torch.dtype) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The adapter's tensors as each layer's four groups (only the groups it targets)."""
    shapes, columns = target_shapes(cfg), target_columns(cfg)
    layers = []
    for layer in range(cfg.n_layers):
        groups = {}
        for group, targets in GROUPS.items():
            present = [(t, adapter.tensors[(layer, t)]) for t in targets if (layer, t) in adapter.tensors]
            if not present:
                continue
            a = torch.cat([pair[0] for _, pair in present])                   # [R, in]
            bt = torch.zeros(a.shape[0], sum(shapes[t][0] for t in targets))   # [R, out]
            row = 0
            for t, (ta, tb) in present:
                col = columns[t]
                bt[row:row + ta.shape[0], col:col + shapes[t][0]] = tb.T
                row += ta.shape[0]
            groups[group] = (a.to(device, dtype).contiguous(), bt.to(device, dtype).contiguous())
        layers.append(groups)
    return layers


def native_layers(adapter: LoraAdapter, cfg: ModelConfig):
    """The adapter as the C kernels' fused layers take it (lora.h): per layer, each target's
    A [r, in] and B^T [r, out] in float32, and where its columns go in its linear's output.
    Returns (ctypes array of LoraLayerStruct, the tensors it points into)."""
    from lumen.engine.native.library import LoraLayerStruct
    shapes, columns = target_shapes(cfg), target_columns(cfg)
    keep = []
    layers = (LoraLayerStruct * cfg.n_layers)()
    for layer in range(cfg.n_layers):
        for index, t in enumerate(TARGETS):   # lora.h's order, GROUPS' too
            if (layer, t) in adapter.tensors:
                a, b = adapter.tensors[(layer, t)]
                at, bt = a.float().contiguous(), b.T.float().contiguous()
                keep += [at, bt]
                entry = layers[layer].t[index]
                entry.at, entry.bt, entry.r, entry.col, entry.n = (at.data_ptr(), bt.data_ptr(), a.shape[0],
                                                                  columns[t], shapes[t][0])
    return layers, keep


@dataclass(slots=True)
class LoraStack:
    """Every loaded adapter's groups stacked for the Triton kernels: a[layer][group] [n, R, in],
    b[layer][group] [n, out, R] (R: the group's largest rank, zero-padded). Rebuilt when the set changes."""
    a: list[dict[str, torch.Tensor]] = field(default_factory=list)
    b: list[dict[str, torch.Tensor]] = field(default_factory=list)

    @classmethod
    def of(cls, adapters: list[AdapterWeights], n_layers: int) -> "LoraStack":
        stack = cls()
        for layer in range(n_layers):
            a_groups, b_groups = {}, {}
            for group in GROUPS:
                pairs = [w.layers[layer].get(group) for w in adapters]
                shape = next((p for p in pairs if p is not None), None)
                if shape is None:
                    continue
                rank = max(p[0].shape[0] for p in pairs if p is not None)
                a0, bt0 = shape
                a = a0.new_zeros(len(adapters), rank, a0.shape[1])
                b = bt0.new_zeros(len(adapters), bt0.shape[1], rank)
                for i, p in enumerate(pairs):
                    if p is not None:
                        a[i, :p[0].shape[0]] = p[0]
                        b[i, :, :p[1].shape[0]] = p[1].T
                a_groups[group], b_groups[group] = a, b
            stack.a.append(a_groups)
            stack.b.append(b_groups)
        return stack


@dataclass(slots=True)
class LoraRows:
    """Rows of a step that use one adapter at one scale: a slice when they are contiguous."""
    weights: AdapterWeights
    scale: float
    rows: slice | torch.Tensor


class LoraStep:
    """The adapters of one forward step. `apply` adds each adapted row's low-rank term to a
    linear's output in place."""

    def __init__(self, groups: list[LoraRows], slots: torch.Tensor, scales: torch.Tensor,
                 stack: LoraStack | None = None) -> None:
        self.groups = groups
        self.slots = slots      # [num_tokens] int32: each row's stack slot, -1 for none (the Triton path)
        self.scales = scales    # [num_tokens] float32
        self.stack = stack

    @classmethod
    def build(cls, row_adapters: list[tuple[int, int, AdapterWeights, float]], num_tokens: int) -> "LoraStep":
        """From (first row, row count, adapter, scale) of each adapted sequence's rows."""
        by_key: dict[tuple[int, float], list[tuple[int, int]]] = {}
        weights: dict[int, AdapterWeights] = {}
        slots = torch.full((num_tokens,), -1, dtype=torch.int32)
        scales = torch.zeros(num_tokens, dtype=torch.float32)
        for first, count, w, scale in row_adapters:
            by_key.setdefault((w.uid, scale), []).append((first, count))
            weights[w.uid] = w
            slots[first:first + count] = w.slot
            scales[first:first + count] = scale
        groups = []
        for (uid, scale), spans in by_key.items():
            spans.sort()
            contiguous = all(spans[i][0] + spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
            rows = (slice(spans[0][0], spans[-1][0] + spans[-1][1]) if contiguous else
                    torch.tensor([r for first, count in spans for r in range(first, first + count)]))
            groups.append(LoraRows(weights[uid], scale, rows))
        return cls(groups, slots, scales)

    def to(self, device: torch.device, stack: LoraStack | None) -> "LoraStep":
        """This step's index tensors on `device` (non-blocking), with the runner's stack."""
        def move(t):
            return t.pin_memory().to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t
        groups = [LoraRows(g.weights, g.scale, move(g.rows)) for g in self.groups]
        return LoraStep(groups, move(self.slots), move(self.scales), stack)

    def native_struct(self, n_layers: int):
        """This step for the C kernels' fused layers (lora.h's lumen_lora_step; set `.layer` per
        layer), with what it points into; None when an adapter has no C form."""
        import ctypes

        from lumen.engine.native.library import LoraStepStruct
        adapters = list({id(g.weights): g.weights for g in self.groups}.values())
        if any(w.native is None for w in adapters):
            return None
        index = {id(w): i for i, w in enumerate(adapters)}
        rows = torch.full((self.slots.shape[0],), -1, dtype=torch.int32)
        for g in self.groups:
            rows[g.rows] = index[id(g.weights)]
        pointers = (ctypes.c_void_p * len(adapters))(*[ctypes.addressof(w.native[0]) for w in adapters])
        struct = LoraStepStruct(rows=rows.data_ptr(), scales=self.scales.data_ptr(),
                                adapters=ctypes.addressof(pointers), n_adapters=len(adapters), layers=n_layers)
        return struct, (rows, pointers)

    def apply(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """y[rows] += scale * (x[rows] @ A^T) @ B^T for every adapted row. x: [num_tokens, in], y: [num_tokens, out]."""
        if self.stack is not None:
            a = self.stack.a[layer].get(group)
            if a is not None:
                from lumen.engine.triton_kernels.lora import lora_expand, lora_shrink
                lora_expand(lora_shrink(x, a, self.slots), self.stack.b[layer][group], self.slots, self.scales, y)
            return
        for g in self.groups:
            pair = g.weights.layers[layer].get(group)
            if pair is None:
                continue
            a, bt = pair
            if isinstance(g.rows, slice):
                y[g.rows].addmm_(x[g.rows].to(a.dtype) @ a.T, bt, alpha=g.scale)
            else:
                t = x.index_select(0, g.rows).to(a.dtype) @ a.T
                y.index_add_(0, g.rows, (t @ bt).to(y.dtype), alpha=g.scale)
