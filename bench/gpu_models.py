"""Llama-3-8B-shaped GGUF files with random weights, written fast on a GPU machine for bench/gpu_check.py.

Random bytes make the blocks (generated on the GPU), with every block's fp16 scales set small and
finite so activations stay finite; F16 matrices are random normals. "Q4_K_M" follows llama.cpp's
mix: Q4_K matrices, attn_v and ffn_down in Q6_K, the output matrix in Q6_K. The vocabulary is
synthetic (byte tokens, then "t<i>" pieces): the benchmarks feed token ids, never text. Only for
timing: these models say nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from lumen.engine.demo.synthetic import SyntheticShape, VocabMetadata, add_llama_metadata

LLAMA3_8B = SyntheticShape(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, context_length=4096,
                           rope_base=500000.0)
LLAMA3_VOCAB = 128256

# (byte offset, value) of each block's fp16 scales: value * the block's quants stays near unit scale.
_SCALES = {Q.Q4_K: [(0, 6e-5), (2, 6e-5)], Q.Q6_K: [(208, 4e-6)], Q.Q8_0: [(0, 1e-4)]}


@dataclass(frozen=True)
class Mix:
    name: str
    default: Q
    overrides: dict[str, Q]     # tensor-name substring -> type

    def qtype(self, name: str) -> Q:
        return next((t for key, t in self.overrides.items() if key in name), self.default)


MIXES = {"Q4_K_M": Mix("Q4_K_M", Q.Q4_K, {"attn_v": Q.Q6_K, "ffn_down": Q.Q6_K, "output.weight": Q.Q6_K}),
         "Q8_0": Mix("Q8_0", Q.Q8_0, {}), "F16": Mix("F16", Q.F16, {})}


def synthetic_vocab(size: int) -> VocabMetadata:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(size - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (size - 259)
    return VocabMetadata(model="llama", tokens=tuple(tokens), scores=tuple(0.0 for _ in tokens),
                         token_types=tuple(types), bos_id=1, eos_id=2, unk_id=0, add_bos=True)


def _matrix(shape: tuple[int, int], qtype: Q, std: float, gen: torch.Generator) -> np.ndarray:
    rows, cols = shape
    dev = gen.device
    if qtype == Q.F16:
        return (torch.randn(shape, generator=gen, device=dev) * std).half().cpu().numpy()
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = torch.randint(0, 256, (rows, cols // block, size), dtype=torch.uint8, generator=gen, device=dev)
    for offset, value in _SCALES[qtype]:
        raw[:, :, offset:offset + 2] = torch.tensor([value], dtype=torch.float16).view(torch.uint8).to(dev)
    return raw.reshape(rows, -1).cpu().numpy()


def write_llama3_8b(path: Path, mix_name: str, seed: int = 0, shape: SyntheticShape = LLAMA3_8B,
                    vocab_size: int = LLAMA3_VOCAB, device: str = "cuda") -> Path:
    """The Llama-3-8B shape (or `shape`, for tests) in `mix_name` (MIXES) at `path`."""
    mix, vocab = MIXES[mix_name], synthetic_vocab(vocab_size)
    d, f, kv = shape.dim, shape.ffn_dim, shape.kv_dim
    specs: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (vocab_size, d))]
    for i in range(shape.n_layers):
        specs += [(f"blk.{i}.attn_norm.weight", (d,)), (f"blk.{i}.attn_q.weight", (d, d)),
                  (f"blk.{i}.attn_k.weight", (kv, d)), (f"blk.{i}.attn_v.weight", (kv, d)),
                  (f"blk.{i}.attn_output.weight", (d, d)), (f"blk.{i}.ffn_norm.weight", (d,)),
                  (f"blk.{i}.ffn_gate.weight", (f, d)), (f"blk.{i}.ffn_up.weight", (f, d)),
                  (f"blk.{i}.ffn_down.weight", (d, f))]
    specs += [("output_norm.weight", (d,)), ("output.weight", (vocab_size, d))]
    gen = torch.Generator(device=device).manual_seed(seed)
    writer = gguf.GGUFWriter(path, arch="llama")
    file_type = getattr(gguf.LlamaFileType, {"F16": "MOSTLY_F16"}.get(mix_name, "MOSTLY_" + mix_name))
    add_llama_metadata(writer, shape, vocab_size, file_type, f"llama3-8b-shaped-{mix_name.lower()}")
    vocab.add_to_writer(writer)
    for name, dims in specs:
        qtype = Q.F32 if len(dims) == 1 else mix.qtype(name)
        if qtype == Q.F32:
            writer.add_tensor_info(name, dims, np.dtype(np.float32), 4 * dims[0])
        elif qtype == Q.F16:
            writer.add_tensor_info(name, dims, np.dtype(np.float16), 2 * dims[0] * dims[1])
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(dims, qtype)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1],
                                   raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, dims in specs:
        if len(dims) == 1:
            writer.write_tensor_data(np.ones(dims, dtype=np.float32))
        else:
            writer.write_tensor_data(_matrix(dims, mix.qtype(name), dims[1] ** -0.5, gen))
    writer.close()
    return path
