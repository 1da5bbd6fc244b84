"""How close the exact mode's matmuls come to this CPU's float32 ceiling: lumen_qmatmul against
torch's own float32 matmul (oneDNN / MKL, the best float32 GEMM at hand) on the same shape, in
alternating rounds of one process (this machine's speed drifts from minute to minute).

    cd bench && ../.venv/bin/python fp32_ceiling.py [--types Q4_0 Q4_K Q6_K] [--rows 16 128]
                                                    [--rounds 7] [--threads 2] [--onednn]

--onednn compares with oneDNN's prepacked float32 linear instead (what Lumen ran float32 weights
with on the CPU before they moved to the C kernels, for batch invariance: `--types F32`).

Weights: bench/kernel_ab.py's TinyLlama FFN matrices (5632 x 2048; random quants, fp16 scales of
0.01), one copy, so the comparison is of arithmetic, not of memory. Reported per type and batch
rows: GFLOP/s (2 M N K / time, medians) of Lumen and of torch's float32 matmul x @ W^T with W
already float32, and Lumen / torch. Lumen also decodes its weights inside the timed call; torch
does not have to.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from kernel_ab import TYPES, K, N, weights  # noqa: E402  (sets sys.path)

from lumen.engine.model.linear import OneDNNLinear  # noqa: E402
from lumen.engine.native import kernels as native  # noqa: E402
from lumen.engine.native import library  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", nargs="+", default=["Q4_0", "Q4_K", "Q6_K"], choices=sorted(TYPES))
    p.add_argument("--rows", type=int, nargs="+", default=[16, 128])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--onednn", action="store_true", help="torch's side: oneDNN's prepacked linear (batch hint 4)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"{library.describe()}; {args.threads} threads; {N} x {K} weights; torch {torch.__version__}")
    torch_side = "oneDNN prepacked" if args.onednn else "torch float32"
    print(f"| type | rows | Lumen exact GFLOP/s | {torch_side} GFLOP/s | Lumen / torch |")
    print("|---|---|---|---|---|")
    for name in args.types:
        qtype, (raw, *_) = weights(name, 1, rng)
        wf = native.decode_rows(qtype, raw, K)
        packed = OneDNNLinear(wf.contiguous()) if args.onednn else None
        for m in args.rows:
            x, y, yt = torch.randn(m, K), torch.empty(m, N), torch.empty(m, N)
            lumen = lambda: native.qmatmul_into(qtype, raw, K, x, y)        # noqa: E731
            if packed is not None:
                ref = lambda: yt.copy_(packed(x))                           # noqa: E731
            else:
                ref = lambda: torch.matmul(x, wf.t(), out=yt)               # noqa: E731
            lumen(), ref()
            assert torch.allclose(y, yt, rtol=1e-3, atol=1e-3), "Lumen and torch disagree"
            times: dict[str, list[float]] = {"lumen": [], "torch": []}
            for r in range(args.rounds):
                for key, fn in ((("lumen", lumen), ("torch", ref)) if r % 2 == 0 else (("torch", ref), ("lumen", lumen))):
                    times[key].append(timed(fn))
            rate = {k: 2 * m * N * K / statistics.median(v) / 1e9 for k, v in times.items()}
            print(f"| {name} | {m} | {rate['lumen']:.0f} | {rate['torch']:.0f} | {rate['lumen'] / rate['torch']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
