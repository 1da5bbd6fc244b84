"""How fast the C matmuls stream a whole model's weights, by where the weights live.

    cd bench && ../.venv/bin/python weight_streaming.py [--types Q4_0 Q8_0 Q4_K_M Q6_K] [--passes 5]

One decode step's matmuls without anything else: every weight matrix of the synthetic
TinyLlama-shaped file (bench/quant_cpu.py makes them) multiplied once by one activation row,
in model order, so each byte comes from memory (the model is larger than the caches). Two
placements of the same bytes, alternated pass by pass in one process:
  mapped    views of the file's mapping (4 KiB page-cache pages), as the loader once kept them;
  resident  the loader's huge-page arena (lumen.engine.weights.resident), as it keeps them now.
Median milliseconds per pass and GB/s of weight bytes, as a Markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
from common import RESULTS  # noqa: E402  (sets sys.path)
from gguf import GGUFReader

from lumen.engine.model.linear import ConcatLinear, NativeQuantLinear  # noqa: E402
from lumen.engine.native import kernels as native  # noqa: E402
from lumen.engine.weights.gguf_loader import load_gguf  # noqa: E402


def matrices(weights) -> list[NativeQuantLinear]:
    out: list[NativeQuantLinear] = []
    for lin in [getattr(layer, a) for layer in weights.layers for a in ("wqkv", "wo", "w_gate_up", "w_down")] \
            + [weights.output]:
        out.extend(lin.parts if isinstance(lin, ConcatLinear) else [lin])
    assert all(isinstance(m, NativeQuantLinear) for m in out)
    return out


def mapped_views(path, mats: list[NativeQuantLinear], n_layers: int) -> list[torch.Tensor]:
    """The same matrices' bytes as views of the file mapping, in matrices()' order."""
    tensors = {t.name: t for t in GGUFReader(path, "c").tensors}
    names = [f"blk.{i}.{n}.weight" for i in range(n_layers) for n in
             ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    names.append("output.weight" if "output.weight" in tensors else "token_embd.weight")
    views = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)     # read-only mapping: never written
        for name, m in zip(names, mats, strict=True):
            raw = torch.from_numpy(np.asarray(tensors[name].data).reshape(-1).view(np.uint8))
            views.append(raw.view(m.weight.raw.shape))
            assert torch.equal(views[-1][:1], m.weight.raw[:1]), name
    return views


def one_pass(mats, raws, xs, ys) -> float:
    start = time.perf_counter()
    for m, raw, y in zip(mats, raws, ys):
        native.qmatmul_into(m.weight.qtype, raw, m.in_features, xs[m.in_features], y)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", nargs="+", default=["Q4_0", "Q8_0", "Q4_K_M", "Q6_K"])
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| type | weight MB | mapped ms | mapped GB/s | resident ms | resident GB/s | resident / mapped time |")
    print("|---|---|---|---|---|---|---|")
    for qtype in args.types:
        path = RESULTS / f"tinyllama-synthetic-{qtype.lower()}-llamacpp.gguf"
        weights = load_gguf(path).weights
        mats = matrices(weights)
        placements = {"resident": [m.weight.raw for m in mats],
                      "mapped": mapped_views(path, mats, len(weights.layers))}
        xs = {m.in_features: torch.randn(1, m.in_features) for m in mats}
        ys = [torch.empty(1, m.out_features) for m in mats]
        times: dict[str, list[float]] = {k: [] for k in placements}
        for name, raws in placements.items():     # warm-up: page in the mapping, fault in the arena
            one_pass(mats, raws, xs, ys)
        for _ in range(args.passes):
            for name, raws in placements.items():
                times[name].append(one_pass(mats, raws, xs, ys))
        total = sum(m.weight.nbytes for m in mats)
        mapped, resident = statistics.median(times["mapped"]), statistics.median(times["resident"])
        print(f"| {qtype} | {total / 1e6:.0f} | {mapped * 1e3:.1f} | {total / mapped / 1e9:.1f} | "
              f"{resident * 1e3:.1f} | {total / resident / 1e9:.1f} | {resident / mapped:.2f}x |")


if __name__ == "__main__":
    main()
