"""Instructions per weight in the Triton quantized GEMV's inner loop, compiled for Hopper without a GPU.

    .venv/bin/python bench/quant_gemv_sass.py [--types Q4_0 Q8_0 Q4_K Q6_K] [--n 4096] [--k 4096] [--no-ptx]

The device that can time the kernels is lent to few sessions, so this counts what the GEMV
asks of an H100/H200 (sm_90) instead: it compiles `quant_matmul._gemv_kernel` exactly as a
launch with M = 1 and an [N, K] weight would (the launch's constexprs, tile sizes and
warps from `quant_matmul.gemv_plan`, the same integer specialisation: 16-divisible arguments get
Triton's divisibility hint), with this machine's Triton and the ptxas it ships, disassembles
the cubin with its nvdisasm, and reports the main loop: instructions, the 10 commonest
opcodes, and instructions per weight per thread. At 70% of an H200's measured copy
bandwidth (4270 GB/s, BENCHMARKS.md) a 4.5-bit type streams 5.3e12 weights a second
against about 33e12 thread instructions a second (132 SMs x 4 schedulers x 32 lanes x 1.98
GHz), a ceiling of 6.3 instructions per weight at perfect issue. These are static counts
from one Triton version (the device image may run another): a guide for kernel changes,
not a timing.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)            # compile for the GPU, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import common  # noqa: E402,F401  (sets sys.path)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lumen.engine.triton_kernels import quant_matmul as qm  # noqa: E402
from lumen.engine.triton_kernels.quant_pack import LAYOUTS, pack  # noqa: E402

TYPE_IDS = {lay.name: t for t, lay in LAYOUTS.items()}
TORCH_TO_TRITON = {torch.uint8: "*u8", torch.int8: "*i8", torch.int16: "*i16", torch.int32: "*i32",
                   torch.float16: "*fp16", torch.float32: "*fp32"}


def compile_gemv(qtype: int, n: int, k: int, ptx: bool):
    """The GEMV kernel compiled for sm_90 as quant_matmul would launch it for x [1, k] fp16."""
    lay = LAYOUTS[qtype]
    raw = torch.from_numpy(np.random.default_rng(0).integers(0, 256, n * (k // lay.block_size) * lay.type_size,
                                                             dtype=np.uint8))
    w = pack(raw, qtype, n, k)
    planes = list(w.planes) + [w.planes[0]] * (qm.MAX_PLANES - len(w.planes))
    strides = [p.stride(0) for p in w.planes] + [0] * (qm.MAX_PLANES - len(w.planes))
    block_n, block_g, num_warps, num_stages, split_k, per_split = qm.gemv_plan(lay, n, k)
    n_groups = k // lay.group
    ints = {"M": 1, "N": n, "K": k, "stride_xm": k, "stride_om": n, "n_groups": n_groups, "tiles_per_split": per_split}
    sig = {"x_ptr": "*fp16", "out_ptr": "*fp16", "part_ptr": "*fp32"}
    sig.update({f"p{i}": TORCH_TO_TRITON[p.dtype] for i, p in enumerate(planes)})
    consts = {"QTYPE": qtype, "BLOCK_N": block_n, "BLOCK_G": block_g, "SPLIT_K": split_k,
              "MASK": n_groups % block_g != 0, "VEC": 8, "PTX": ptx}
    names = list(sig) + [f"s{i}" for i in range(5)] + list(ints)
    values = [0] * 8 + strides + list(ints.values())
    for name, value in zip(names[8:], values[8:]):
        if value == 1:
            consts[name] = 1                          # Triton specialises 1 to a constant
        else:
            sig[name] = "i32"
    sig.update({name: "constexpr" for name in consts})
    hinted = [i for i, name in enumerate(names) if name in sig and sig[name] != "constexpr"
              and (i < 8 or values[i] % 16 == 0)]
    attrs = {(i,): [["tt.divisibility", 16]] for i in hinted}
    src = ASTSource(qm._gemv_kernel, sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    threads = num_warps * 32
    return kernel, block_n * block_g * lay.group / threads, (block_n, block_g, num_warps)


def disassemble(cubin: bytes) -> list[str]:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(tool), "-c", str(path)], check=True, capture_output=True, text=True).stdout
    return out.splitlines()


def main_loop(lines: list[str]) -> list[str]:
    """The instructions of the longest loop: from a label to a branch back to it."""
    labels, code = {}, []
    for line in lines:
        if m := re.match(r"^(\.L_x_\d+):", line.strip()):
            labels[m.group(1)] = len(code)
        elif m := re.match(r"\s+/\*[0-9a-f]+\*/\s+(.*?)\s*;", line):
            code.append(m.group(1))
    best: list[str] = []
    for i, ins in enumerate(code):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", ins)
        if m and labels.get(m.group(1), i + 1) <= i and i + 1 - labels[m.group(1)] > len(best):
            best = code[labels[m.group(1)]:i + 1]
    return best


def opcode(ins: str) -> str:
    parts = ins.split()
    return parts[1] if parts[0].startswith("@") else parts[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", nargs="+", default=["Q4_0", "Q8_0", "Q4_K", "Q6_K"], choices=sorted(TYPE_IDS))
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--no-ptx", action="store_true", help="compile the plain-Triton decode instead of the inline PTX")
    args = p.parse_args()
    print(f"Triton {triton.__version__}, sm_90, M = 1, weight {args.n} x {args.k}, x fp16, "
          f"{'plain Triton' if args.no_ptx else 'PTX'} decode")
    print("| type | BLOCK_N, BLOCK_G, warps | loop instructions | weights per thread per pass | "
          "instructions per weight | commonest opcodes |")
    print("|---|---|---|---|---|---|")
    for name in args.types:
        kernel, per_thread, shape = compile_gemv(TYPE_IDS[name], args.n, args.k, not args.no_ptx)
        loop = main_loop(disassemble(kernel.asm["cubin"]))
        assert loop, f"no loop found in the {name} GEMV's code"
        mix = ", ".join(f"{op} {c}" for op, c in Counter(opcode(i) for i in loop).most_common(10))
        print(f"| {name} | {shape[0]}, {shape[1]}, {shape[2]} | {len(loop)} | {per_thread:.0f} | "
              f"{len(loop) / per_thread:.2f} | {mix} |", flush=True)


if __name__ == "__main__":
    main()
