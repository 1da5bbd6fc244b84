"""A/B speed of the C matmul kernels: this tree's sources against a git revision's, in one process.

    cd bench && ../.venv/bin/python kernel_ab.py [--base HEAD] [--types Q8_0 Q4_0 Q4_K Q6_K]
                                                 [--rows 1 4 8 16 64] [--rounds 15] [--mib 512]
                                                 [--variant x86-64-v3] [--base-march native]
                                                 [--new-mode int8] [--base-mode int8] [--new-arithmetic]
                                                 [--interleave] [--shape N K]

Both builds use the flags of one of the installed kernel variants (lumen.engine.native.build),
by default the one this CPU gets; --variant x86-64-v3 (AVX2 + FMA + F16C without AVX-512, which
an AVX-512 CPU runs too) times the AVX2 code paths on an AVX-512 machine. --base-march native
builds the base for this very CPU instead (-march=native): with --base HEAD, what the portable
variant costs against a build for this machine alone.

This machine's speed drifts by 30% from minute to minute (other tenants), so two builds timed
in separate runs cannot be compared. Here both libraries are built with lumen.engine.native's flags
(the base from `git show BASE:engine/native/csrc/...`), loaded side by side, and timed in alternating
rounds (base, new, new, base, ...): each round is one pass of every weight copy through
lumen_qmatmul. Weights: --mib of TinyLlama's 5632 x 2048 FFN matrices (random quants, fp16
scales of 0.01, so no subnormal products), enough copies that they stream from memory. Reported
per type and batch rows: median ms per matmul for each build and the median of the per-round
time ratios base / new (above 1: the new build is faster), with its range.

--new-arithmetic drops the check that both builds give the same bits, for a change that defines
a mode's arithmetic anew.

--new-mode int8 times the new build's int8 matmul mode (lumen_qmatmul_int8) against the base's
exact mode; `--base worktree` takes the base from the working tree too (exact against int8 on
the same sources). Their bits differ, so that comparison does not check them. --base-mode int8
times the base's int8 mode instead (an A/B of the int8 kernels themselves).

--interleave (with --base worktree --base-mode int8 --new-mode int8 and Q4_0 or Q4_1): the
int8 mode on the file's layout (base) against the same weights interleaved 8 rows at a time
(new: kernels.X8, the layout the int8 mode gives a model's weights), same bits required.
--shape N K times N x K weights instead of 5632 x 2048.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import REPO  # noqa: E402  (sets sys.path)

from lumen.engine.native import kernels as native  # noqa: E402
from lumen.engine.native import library  # noqa: E402

TYPES = {"Q8_0": (8, 0), "Q4_0": (2, 0), "Q4_1": (3, 0, 2), "Q4_K": (12, 0, 2), "Q6_K": (14, 208), "Q5_K": (13, 0, 2),
         "Q3_K": (11, 108), "Q2_K": (10, 80, 82), "F16": (1,), "BF16": (30,), "F32": (0,),
         "Q4_0_X8": (native.X8[2], 0), "Q4_1_X8": (native.X8[3], 0, 2)}
# GGML type id (the _X8 types: Lumen's interleaved layouts, kernels.X8), fp16 scale offsets
N, K = 5632, 2048
FLOATS = {1: lambda v: v.astype(np.float16).view(np.uint8), 0: lambda v: v.view(np.uint8),
          30: lambda v: (v.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)}   # F16, F32, BF16 bytes


def build(source_dir: Path, out: Path, flags: tuple[str, ...]) -> ctypes.CDLL:
    library._build(out, flags, library.build.compiler(), source_dir)
    return library.load(out)


def base_sources(rev: str, dest: Path) -> Path:
    for name in library.SOURCES + library.HEADERS:
        # Before the engine's concept folders the sources were engine/csrc/, and rowwise.* was glue.*:
        # an older revision's file is written under both names, so its own #includes resolve.
        old = name.replace("rowwise", "glue")
        for path in (f"engine/native/csrc/{name}", f"engine/csrc/{old}"):
            done = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO, capture_output=True)
            if done.returncode == 0:
                for written in {name, old}:
                    (dest / written).write_bytes(done.stdout)
                break
        else:
            raise SystemExit(f"{rev} has no {name} (nor the older engine/csrc/{old})")
    return dest


def weights(type_name: str, mib: int, rng: np.random.Generator) -> tuple[int, list[torch.Tensor]]:
    qtype, *fp16 = TYPES[type_name]
    block_size, type_size = native.block_layout(native.X8_BASE.get(qtype, qtype))
    row_bytes = K // block_size * type_size
    copies = max(1, mib * 2**20 // (N * row_bytes))
    out = []
    for _ in range(copies):
        if qtype in FLOATS:                          # float rows: every value a small normal number
            raw = FLOATS[qtype](np.full((N, K), 0.01, np.float32))
        else:
            raw = rng.integers(0, 256, (N, K // block_size, type_size), dtype=np.uint8)
            for off in fp16:
                raw[:, :, off:off + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        out.append(torch.from_numpy(raw.reshape(N, row_bytes)))
    if qtype in native.X8_BASE:                      # the int8 mode's layout (8 rows interleaved)
        return interleaved(native.X8_BASE[qtype], out)
    return qtype, out


def interleaved(qtype: int, ws: list[torch.Tensor]) -> tuple[int, list[torch.Tensor]]:
    """Copies of a Q4_0 or Q4_1 weight's copies in the int8 mode's interleaved layout (kernels.X8)."""
    out = [w.clone() for w in ws]
    for w in out:
        native.interleave(w, qtype, K, True)
    return native.X8[qtype], out


def one_pass(lib: ctypes.CDLL, qtype: int, ws: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             mode: str = "exact") -> float:
    threads = torch.get_num_threads()
    fn = lib.lumen_qmatmul_int8 if mode == "int8" else lib.lumen_qmatmul
    start = time.perf_counter()
    for w in ws:
        rc = fn(qtype, w.data_ptr(), w.shape[1], N, K, x.data_ptr(), x.shape[0], K,
                               y.data_ptr(), N, threads)
        assert rc == 0, f"lumen_qmatmul returned {rc}"
    return (time.perf_counter() - start) / len(ws)


def compare(libs: dict[str, ctypes.CDLL], qtype: int, ws: list[torch.Tensor], rows: int, rounds: int,
            modes: dict[str, str], same_bits: bool = True, new_weights: tuple[int, list] | None = None) -> dict:
    """new_weights: the new build's (type, copies) when they differ from the base's (an interleaved layout)."""
    x = torch.randn(rows, K)
    ys = {name: torch.empty(rows, N) for name in libs}
    times: dict[str, list[float]] = {name: [] for name in libs}
    weights_of = {"base": (qtype, ws), "new": new_weights or (qtype, ws)}
    for name, lib in libs.items():                   # warm-up, and the two builds must agree exactly
        one_pass(lib, weights_of[name][0], weights_of[name][1][:1], x, ys[name], modes[name])
    if modes["base"] == modes["new"] and same_bits:
        assert torch.equal(ys["base"], ys["new"]), "the two builds give different bits"
    for r in range(rounds):
        order = ("base", "new") if r % 2 == 0 else ("new", "base")
        for name in order:
            times[name].append(one_pass(libs[name], *weights_of[name], x, ys[name], modes[name]))
    ratios = sorted(b / n for b, n in zip(times["base"], times["new"]))
    return {"base_ms": 1e3 * statistics.median(times["base"]), "new_ms": 1e3 * statistics.median(times["new"]),
            "ratio": statistics.median(ratios), "low": ratios[0], "high": ratios[-1]}


def main() -> None:
    global N, K
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="HEAD", help="git revision whose C sources are the baseline")
    p.add_argument("--types", nargs="+", default=["Q8_0", "Q4_0", "Q4_K", "Q6_K"], choices=sorted(TYPES))
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 64])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--mib", type=int, default=512, help="weight bytes per type, spread over copies")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--interleave", action="store_true",
                   help="the new build multiplies the same Q4_0 or Q4_1 weights interleaved (kernels.X8, "
                        "the int8 mode's layout of them) and the base the file's layout: same bits required")
    p.add_argument("--shape", type=int, nargs=2, default=[N, K], metavar=("N", "K"),
                   help="weight rows and columns (default: TinyLlama's FFN up matrix, 5632 x 2048)")
    p.add_argument("--new-arithmetic", action="store_true",
                   help="the new build defines the mode's arithmetic anew: do not require the same bits")
    p.add_argument("--variant", default=None, help="the kernel variant whose flags both builds use "
                                                   "(default: the one this CPU runs)")
    p.add_argument("--base-march", default=None, help="build the base with -march=THIS (e.g. native) instead")
    p.add_argument("--new-mode", choices=("exact", "int8"), default="exact", help="the new build's matmul mode")
    p.add_argument("--base-mode", choices=("exact", "int8"), default="exact", help="the base build's matmul mode")
    args = p.parse_args()
    N, K = args.shape
    variant = library.build.variant(args.variant) if args.variant else library.selected()
    new_flags = library.flags(variant)
    base_flags = new_flags
    if args.base_march:
        base_flags = tuple(f for f in new_flags if not f.startswith(("-march=", "-mtune="))) + (f"-march={args.base_march}",)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="kernel-ab-") as tmp:
        tmp = Path(tmp)
        (tmp / "base").mkdir()
        base_dir = library.SOURCE_DIR if args.base == "worktree" else base_sources(args.base, tmp / "base")
        libs = {"base": build(base_dir, tmp / "base.so", base_flags),
                "new": build(library.SOURCE_DIR, tmp / "new.so", new_flags)}
        print(f"base: {args.base} ({' '.join(base_flags[-4:])}); new: the working tree ({variant.name}, "
              f"{args.new_mode} mode; base: {args.base_mode} mode). "
              f"{args.threads} threads, "
              f"{args.rounds} rounds, {N} x {K} weights.")
        print("| type | rows | base ms | new ms | base / new (median) | range |")
        print("|---|---|---|---|---|---|")
        for type_name in args.types:
            qtype, ws = weights(type_name, args.mib, rng)
            new_weights = interleaved(qtype, ws) if args.interleave else None
            for rows in args.rows:
                r = compare(libs, qtype, ws, rows, args.rounds, {"base": args.base_mode, "new": args.new_mode},
                            not args.new_arithmetic, new_weights)
                print(f"| {type_name} | {rows} | {r['base_ms']:.3f} | {r['new_ms']:.3f} | {r['ratio']:.2f}x | "
                      f"{r['low']:.2f}-{r['high']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
