"""GPU benchmark of the quantized-weight matmul kernels (written for an H200).

    python3 bench/quant_gemv_gpu.py [--types Q4_0,Q8_0,Q4_K,Q6_K] [--sweep] [--sweep-gemm]

Decode (M=1, the GEMV) is memory bound: for each type and weight shape (N, K) in (4096, 4096),
(14336, 4096) and (4096, 14336) it reports the bandwidth achieved, (packed weight + x + y bytes)
/ time, against a measured device-to-device copy of a large buffer; M=1 is also run through the
tensor-core GEMM (16-row tiles), and M=16 (GEMM, still memory bound) is reported the same way.
Prefill (M=512) is reported in TFLOP/s against torch.matmul on the dequantized fp16 weight.
x is fp16.

Every kernel is first checked against a reference: this script's own small torch dequantizer of
the GGUF blocks (`dequantize_reference`, written from ggml's block layouts), so it needs
neither gguf nor an installed project. Times are medians of CUDA-graph replays
(do_bench_cudagraph; `--timer eager` for do_bench); calls rotate over enough weight copies to
exceed 4x L2, so no weight is served from cache. `--sweep` times M=1 tile configurations per type, GEMV and GEMM (it replaces
`quant_matmul._gemv_config`, `_gemm_config` and `GEMV_MAX_M` for a moment), `--sweep-gemm` a
few GEMM ones for M=512.
It needs a CUDA device and exits with a message when there is none; it never writes files.
"""
from __future__ import annotations

import argparse
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]     # (N, K): out x in features
REF_TYPES = {"Q4_0": 2, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}                   # GGML type ids
GGUF_BLOCKS = {"Q4_0": (32, 2 + 16), "Q8_0": (32, 2 + 32),                  # (values, bytes) a block
               "Q4_K": (256, 4 + 12 + 128), "Q6_K": (256, 128 + 64 + 16 + 2)}
FP16_FIELDS = {"Q4_0": (0,), "Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}   # byte offsets in a block


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/quant_gemv_gpu.py needs a CUDA GPU (it times the Triton kernels); none is visible. "
                 "Run it on a GPU machine, or use the tests (TRITON_INTERPRET=1) for correctness on CPU.")
    import triton.testing  # after the check, so that a machine without a GPU gets the message above

    def bench(fn, quick: bool = False) -> float:
        """Median seconds of one call of fn.

        The default replays a CUDA graph of many calls, so the host's launch overhead (tens of
        microseconds a call, more than these kernels take) is not timed; do_bench times each call
        between events, which includes it whenever the host falls behind (`--timer eager`)."""
        if args.timer == "graph":
            return triton.testing.do_bench_cudagraph(fn, rep=20 if quick else 100, return_mode="median") * 1e-3
        return triton.testing.do_bench(fn, warmup=10, rep=40 if quick else 150, return_mode="median") * 1e-3

    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 60 << 20) or (60 << 20)
    types = [t.strip() for t in args.types.split(",")]
    unknown = [t for t in types if t not in REF_TYPES]
    if unknown:
        sys.exit(f"--types: no reference dequantizer here for {unknown}; choose from {list(REF_TYPES)}")
    copy_gbs = copy_bandwidth(bench, device, args.copy_bytes)
    cases = {(t, shape): Case(t, *shape, device, 4 * l2) for t in types for shape in SHAPES}
    if args.sweep:
        sweep_decode(cases, types, bench, copy_gbs)
    if args.sweep_gemm:
        sweep_gemm(cases, types, bench)
    rows = [(f"device-to-device copy ({args.copy_bytes >> 20} MiB)", "-", "-", "-", f"{copy_gbs:.0f} GB/s", "100%")]
    for t in types:
        for shape in SHAPES:
            rows += run_case(cases[(t, shape)], bench, copy_gbs)
    print_table(props.name, args.timer, rows)


class Case:
    """One type and weight shape: packed copies (together over `cover` bytes), x, the fp32 reference."""

    def __init__(self, qtype: str, n: int, k: int, device: torch.device, cover: int):
        from lumen.engine.triton_kernels.quant_matmul import pack
        self.qtype, self.n, self.k, self.device = qtype, n, k, device
        raw = random_gguf_blocks(qtype, n, k, device, seed=n * 31 + k)
        self.weight = dequantize_reference(raw, qtype, n, k)                   # [n, k] fp32
        first = pack(raw, REF_TYPES[qtype], n, k, device)
        copies = max(2, math.ceil(cover / first.nbytes))
        self.packed = [first] + [pack(raw, REF_TYPES[qtype], n, k, device) for _ in range(copies - 1)]   # new planes
        self.nbytes = first.nbytes
        self.turn = 0
        self.x = {}

    def inputs(self, m: int) -> torch.Tensor:
        if m not in self.x:
            gen = torch.Generator(device=self.device).manual_seed(m)
            self.x[m] = torch.randn((m, self.k), generator=gen, device=self.device).half()
        return self.x[m]

    def call(self, m: int):
        """A closure that multiplies by the next weight copy on each call."""
        from lumen.engine.triton_kernels.quant_matmul import quant_matmul
        x = self.inputs(m)

        def fn():
            self.turn = (self.turn + 1) % len(self.packed)
            return quant_matmul(x, self.packed[self.turn])
        return fn

    def check(self, m: int) -> float:
        """Relative error ||y - ref|| / ||ref|| of the kernel against the fp32 reference."""
        from lumen.engine.triton_kernels.quant_matmul import quant_matmul
        x = self.inputs(m)
        ref = x.float() @ self.weight.T
        y = quant_matmul(x, self.packed[0]).float()
        return ((y - ref).norm() / ref.norm()).item()

    def moved(self, m: int) -> int:
        """Bytes a call must move: the packed weight, x read and y written (fp16)."""
        return self.nbytes + 2 * m * (self.k + self.n)

    def label(self) -> str:
        return f"{self.qtype} {self.n}x{self.k}"


def run_case(case: Case, bench, copy_gbs: float) -> list[tuple[str, ...]]:
    from lumen.engine.triton_kernels import quant_matmul as qm
    rows = []
    for m, path, patch in ((1, "GEMV", {}), (1, "GEMM, BLOCK_M=16", {"GEMV_MAX_M": 0}), (16, "GEMM", {})):
        with patched(qm, **patch):
            err = require_correct(case, m)
            seconds = bench(case.call(m))
        gbs = case.moved(m) / seconds / 1e9
        rows.append((case.label(), f"M={m} {path}", f"{seconds * 1e6:.1f} us", f"{err:.1e}",
                     f"{gbs:.0f} GB/s", f"{gbs / copy_gbs:.0%} of copy"))
    m = 512
    err = require_correct(case, m)
    flops = 2 * m * case.n * case.k
    seconds = bench(case.call(m))
    torch_s = torch_matmul_time(case, m, bench)
    rows.append((case.label(), f"M={m} GEMM", f"{seconds * 1e3:.3f} ms", f"{err:.1e}",
                 f"{flops / seconds / 1e12:.0f} TFLOP/s", f"{torch_s / seconds:.0%} of torch fp16"))
    rows.append((case.label(), f"M={m} torch.matmul, dequantized fp16 W", f"{torch_s * 1e3:.3f} ms", "-",
                 f"{flops / torch_s / 1e12:.0f} TFLOP/s", "100%"))
    return rows


@contextmanager
def patched(module, **attrs):
    """Replace module attributes (tile-config functions, GEMV_MAX_M) for the duration of the block."""
    saved = {name: getattr(module, name) for name in attrs}
    for name, value in attrs.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def require_correct(case: Case, m: int) -> float:
    err = case.check(m)
    if not err < 2e-3:
        raise SystemExit(f"{case.label()} M={m}: relative error {err:.3g} against the reference; "
                         "not benchmarking a wrong kernel")
    return err


def torch_matmul_time(case: Case, m: int, bench) -> float:
    w16 = case.weight.half()
    x = case.inputs(m)
    return bench(lambda: torch.matmul(x, w16.T))


def sweep_decode(cases: dict, types: list[str], bench, copy_gbs: float) -> None:
    """Time M=1 tile configurations (each checked first) over the three shapes: one line each, then the best.

    GEMV configs are (BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K): phase 1 crosses rows a
    program with K values a tile and warps, phase 2 tries split-K and num_stages on the two
    fastest. Then M=1 through the tensor-core GEMM (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
    """
    from lumen.engine.triton_kernels import quant_matmul as qm
    for t in types:
        group = qm.LAYOUTS[REF_TYPES[t]].group
        phase1 = [(bn, groups * group, warps, 1, 1) for bn, groups, warps in (
            (1, 32, 2), (2, 32, 2), (4, 32, 2), (8, 32, 2), (1, 64, 4), (2, 64, 4), (4, 64, 4), (8, 64, 4),
            (2, 128, 8), (4, 128, 8))]
        gemv = [(time_config(cases, t, cfg, bench, copy_gbs, _gemv_config=lambda *_, c=cfg: c), cfg)
                for cfg in phase1]
        top = sorted((r for r in gemv if r[0] is not None), key=lambda r: r[0])[:2]
        phase2 = [(bn, bk, w, stages, split) for _, (bn, bk, w, _, _) in top
                  for stages, split in ((1, 2), (1, 4), (2, 1))]
        gemv += [(time_config(cases, t, cfg, bench, copy_gbs, _gemv_config=lambda *_, c=cfg: c), cfg)
                 for cfg in phase2]
        gemm_cfgs = [(16, bn, max(bk, 2 * group), warps, stages) for bn, bk, warps, stages in
                     ((64, 256, 4, 3), (64, 128, 4, 4), (128, 128, 4, 3), (32, 256, 4, 3), (64, 256, 8, 3))]
        gemm = [(time_config(cases, t, cfg, bench, copy_gbs, GEMV_MAX_M=0, _gemm_config=lambda *_, c=cfg: c), cfg)
                for cfg in gemm_cfgs]
        for path, results in (("GEMV (BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K)", gemv),
                              ("GEMM (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)", gemm)):
            ok = [r for r in results if r[0] is not None]
            if ok:
                total, cfg = min(ok, key=lambda r: r[0])
                print(f"sweep {t} M=1 best {path} = {cfg}: {total * 1e6:.1f} us over the {len(SHAPES)} shapes",
                      flush=True)


def time_config(cases: dict, qtype: str, cfg: tuple, bench, copy_gbs: float, **patch) -> float | None:
    """Seconds summed over the shapes for M=1 under `patch`, or None when it fails or is wrong."""
    from lumen.engine.triton_kernels import quant_matmul as qm
    parts, total = [], 0.0
    with patched(qm, **patch):
        for shape in SHAPES:
            case = cases[(qtype, shape)]
            try:
                err = case.check(1)
                if not err < 2e-3:
                    raise ValueError(f"relative error {err:.3g}")
            except Exception as e:   # e.g. out of registers or shared memory for a big tile
                print(f"sweep {qtype} {cfg}: {case.n}x{case.k} failed: {str(e).splitlines()[0][:120]}", flush=True)
                return None
            seconds = bench(case.call(1), quick=True)
            gbs = case.moved(1) / seconds / 1e9
            parts.append(f"{case.n}x{case.k} {seconds * 1e6:.1f} us {gbs:.0f} GB/s {gbs / copy_gbs:.0%}")
            total += seconds
    print(f"sweep {qtype} M=1 {cfg}: " + " | ".join(parts), flush=True)
    return total


def sweep_gemm(cases: dict, types: list[str], bench) -> None:
    """Time a few GEMM configs (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) at M=512 on (14336, 4096)."""
    from lumen.engine.triton_kernels import quant_matmul as qm
    m = 512
    for t in types:
        case = cases[(t, SHAPES[1])]
        flops = 2 * m * case.n * case.k
        group = qm.LAYOUTS[REF_TYPES[t]].group
        for bm, bn, kvals, warps, stages in ((128, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 256, 8, 2),
                                             (128, 64, 128, 4, 3), (64, 128, 128, 4, 3), (128, 256, 128, 8, 3)):
            cfg = (bm, bn, max(kvals, 2 * group), warps, stages)
            with patched(qm, _gemm_config=lambda *_: cfg):
                try:
                    require_correct(case, m)
                except (Exception, SystemExit) as e:
                    print(f"sweep-gemm {t} {cfg}: failed: {str(e).splitlines()[0][:120]}", flush=True)
                    continue
                seconds = bench(case.call(m), quick=True)
            print(f"sweep-gemm {t} {case.n}x{case.k} M={m} (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) = {cfg}: "
                  f"{seconds * 1e3:.3f} ms {flops / seconds / 1e12:.0f} TFLOP/s", flush=True)


def copy_bandwidth(bench, device: torch.device, nbytes: int) -> float:
    """GB/s of a large device-to-device copy, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = bench(lambda: dst.copy_(src))
    return 2 * nbytes / seconds / 1e9


def random_gguf_blocks(qtype: str, n: int, k: int, device: torch.device, seed: int) -> torch.Tensor:
    """GGUF bytes [n, k / block * type_size]: random quants, fp16 scales ~ N(0, 1e-3) like real weights."""
    block, size = GGUF_BLOCKS[qtype]
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks = torch.randint(0, 256, (n, k // block, size), dtype=torch.uint8, device=device, generator=gen)
    for off in FP16_FIELDS[qtype]:
        scale = (torch.randn((n, k // block), generator=gen, device=device) * 1e-3).half()
        blocks[:, :, off:off + 2] = scale.view(torch.uint8).reshape(n, k // block, 2)
    return blocks.reshape(n, -1)


def dequantize_reference(raw: torch.Tensor, qtype: str, n: int, k: int) -> torch.Tensor:
    """float32 [n, k] from GGUF bytes, straight from ggml's dequantize_row_* (not from the packed planes)."""
    b = raw.reshape(n * k // GGUF_BLOCKS[qtype][0], -1)                        # [blocks, type_size]
    half = lambda field: field.contiguous().view(torch.float16).float()        # noqa: E731
    if qtype == "Q4_0":
        qs = b[:, 2:18]
        q = torch.cat([qs & 15, qs >> 4], dim=1).float() - 8                    # values j, then j + 16
        return (half(b[:, 0:2]) * q).reshape(n, k)
    if qtype == "Q8_0":
        return (half(b[:, 0:2]) * b[:, 2:34].contiguous().view(torch.int8).float()).reshape(n, k)
    if qtype == "Q4_K":
        d, dmin, s, qs = half(b[:, 0:2]), half(b[:, 2:4]), b[:, 4:16].int(), b[:, 16:144]
        sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], dim=1).float()
        mn = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1).float()
        chunks = qs.reshape(-1, 4, 1, 32)
        q = torch.cat([chunks & 15, chunks >> 4], dim=2).reshape(-1, 8, 32).float()   # sub-block 2c, 2c + 1
        return ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(n, k)
    ql, qh = b[:, 0:128].reshape(-1, 2, 2, 32), b[:, 128:192].reshape(-1, 2, 1, 32)   # Q6_K: [half, ...]
    sc, d = b[:, 192:208].contiguous().view(torch.int8).float(), half(b[:, 208:210])
    low = torch.cat([ql & 15, ql >> 4], dim=2)                                  # [nb, half, 4, 32]
    high = torch.cat([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=2)              # [nb, half, 4, 32]
    q = (low | (high << 4)).float() - 32                                        # value 128h + 32i + l
    return (d * sc.repeat_interleave(16, dim=1) * q.reshape(-1, 256)).reshape(n, k)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", default=",".join(REF_TYPES), help="comma-separated GGUF types to time")
    p.add_argument("--sweep", action="store_true", help="first time GEMV tile configurations per type")
    p.add_argument("--sweep-gemm", action="store_true", help="first time a few GEMM tile configurations (M=512)")
    p.add_argument("--copy-bytes", type=int, default=2 << 30, help="size of the copy that sets the bandwidth roof")
    p.add_argument("--timer", choices=("graph", "eager"), default="graph",
                   help="graph: do_bench_cudagraph (kernel time); eager: do_bench, with launch overhead and L2 flushes")
    return p.parse_args(argv)


def print_table(device_name: str, timer: str, rows: list[tuple[str, ...]]) -> None:
    print(f"### Quantized-weight matmul on {device_name}, x fp16, y = x @ W^T with W [N, K]\n")
    how = "CUDA-graph replays" if timer == "graph" else "do_bench (eager launches, L2 flushed)"
    print(f"Times: medians of {how}. Bytes moved = packed weight + x + y. "
          "Relative error against an fp32 matmul on the dequantized weight.\n")
    print("| weight | case | time | rel. error | achieved | vs reference |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
