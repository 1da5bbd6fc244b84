"""Lumen's C kernels for CPU, compiled on first use and called through ctypes.

`engine/native/csrc/` holds the sources: per-format block decoders (bit-exact with ggml), a
batch-invariant matmul that decodes a tile of weight rows once and multiplies it by every
activation row (see qmatmul.c), the decode attention over the paged KV cache (attention.c),
the row-wise work between a layer's matmuls (rowwise.c: RMSNorm, RoPE with the KV store, SiLU
gating), and a whole decoder layer chaining them in one call (layer.c). They are built for
the machine they run on (`-march=native`) into the cache directory (`$LUMEN_CACHE_DIR`, else
`$XDG_CACHE_HOME/lumen`, else `~/.cache/lumen`), named by a digest of the sources, flags,
compiler and CPU, so a stale or foreign build is never loaded. Building with the system C
compiler (`$CC`, else `cc`) takes most of a minute (qmatmul.c instantiates its kernels for
every type and batch shape), once per machine and source version; it is logged. Without a
compiler `library()` raises `NativeUnavailable` and callers use their torch path.

The library is linked with -fopenmp and resolves `libgomp.so.1` to the copy torch has
already loaded, so it shares torch's thread pool instead of starting a second one.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

from lumen.engine.cache_dir import default_cache_dir

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).with_name("csrc")
SOURCES = ("qmatmul.c", "attention.c", "rowwise.c", "layer.c")
HEADERS = ("qmatmul.h", "decoders.h", "attention.h", "rowwise.h", "layer.h", "simd.h")
# No implicit fused multiply-adds: the decoders are bit-exact with ggml's only unfused, and
# the matmul spells its fma out.
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fPIC", "-std=gnu11", "-fopenmp", "-ffp-contract=off",
         "-Wall", "-Werror", "-Wno-psabi")
# LUMEN_NATIVE_SANITIZE=1 builds (and caches apart) a library under AddressSanitizer and UBSan,
# for `make sanitize`; loading it needs the sanitizer runtimes preloaded (the Makefile does that).
SANITIZE_FLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer",
                  "-g")


def _flags() -> tuple[str, ...]:
    flags = FLAGS
    # LUMEN_NATIVE_MARCH=x86-64-v3 (say) builds for another instruction set than this CPU's, so the
    # kernel tests can run the AVX2 paths on an AVX-512 machine (`make test-isa`).
    if march := os.environ.get("LUMEN_NATIVE_MARCH"):
        flags = tuple(f"-march={march}" if f.startswith("-march=") else f for f in flags
                      if f != "-mprefer-vector-width=512")
    if os.environ.get("LUMEN_NATIVE_SANITIZE") == "1":
        # -O1: at -O3 the instrumented kernels take a quarter of an hour to compile on 2 cores.
        flags = tuple("-O1" if f == "-O3" else f for f in flags) + SANITIZE_FLAGS
    return flags


class NativeUnavailable(RuntimeError):
    """The C kernels cannot be built or loaded here (the message says why)."""


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


# The AVX-512 subsets the kernels' full vector paths are written for (simd.h, decoders.h), and
# what the AVX2 paths need (simd.h's fma, qmatmul.c's AVX2_STREAM).
VECTOR_FLAGS = ("avx512f", "avx512bw", "avx512vl")
AVX2_FLAGS = ("avx2", "fma", "f16c")


def vector_isa() -> str | None:
    """The vector instruction set the C kernels use on this CPU (they are built with
    -march=native): "AVX-512" (every path), "AVX2" (some paths), or None (scalar code)."""
    flags = set(_cpu_signature().split())
    if all(f in flags for f in VECTOR_FLAGS):
        return "AVX-512"
    return "AVX2" if all(f in flags for f in AVX2_FLAGS) else None


def describe() -> str:
    """One line for the server's log: how the C kernels will run here."""
    isa, machine = vector_isa(), platform.machine()
    if isa == "AVX-512":
        return f"C kernels: AVX-512 vector paths ({machine}, built with -march=native)"
    if isa == "AVX2":
        return (f"C kernels: AVX2 vector paths for Q8_0, Q4_0 and Q4_1 at 1-4 rows only ({machine}, no AVX-512); "
                "other types and larger batches run scalar code, several times slower than llama.cpp")
    return (f"C kernels: no vector path for this CPU ({machine}, no AVX-512 or AVX2): they run scalar code, "
            "8-20x slower than llama.cpp on the same machine (BENCHMARKS.md, Machines)")


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


def _digest(cc: str) -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes())
    h.update(repr((_flags(), platform.machine(), _cpu_signature())).encode())
    try:
        h.update(subprocess.run([cc, "--version"], capture_output=True, check=True).stdout)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise NativeUnavailable(f"no working C compiler {cc!r} ({exc}); set CC to one") from exc
    return h.hexdigest()[:16]


def _build(target: Path, cc: str, source_dir: Path = SOURCE_DIR) -> None:
    """Compile SOURCES from source_dir into the shared library `target` (bench/kernel_ab.py
    also builds an older revision's sources with it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        objects = []
        for name in SOURCES:
            obj = Path(tmp) / (name + ".o")
            _run([cc, *_flags(), "-c", str(source_dir / name), "-o", str(obj)])
            objects.append(str(obj))
        out = Path(tmp) / target.name
        sanitize = [f for f in _flags() if f.startswith("-fsanitize")]
        _run([cc, "-shared", "-fopenmp", *sanitize, *objects, "-o", str(out), "-lm"])
        os.replace(out, target)    # atomic: a racing build renames identical bytes


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise NativeUnavailable(f"building the C kernels failed: {' '.join(cmd)}\n{done.stderr.strip()}")


@functools.cache
def library() -> ctypes.CDLL:
    """The loaded kernel library, built first if this machine has no current build."""
    cc = _compiler()
    target = default_cache_dir() / "native" / f"liblumen_cpu-{_digest(cc)}.so"
    if not target.exists():
        log.warning("building the C kernels into %s (once for this machine and source version, "
                    "about a minute)", target.parent)
        _build(target, cc)
    return load(target)


def load(path: Path) -> ctypes.CDLL:
    """A built kernel library with its functions' C signatures declared (bench/kernel_ab.py loads
    an older revision's build with it too)."""
    lib = ctypes.CDLL(str(path))
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.lumen_block_layout.argtypes = [i32, ctypes.POINTER(i32), ctypes.POINTER(i32)]
    lib.lumen_block_layout.restype = i32
    lib.lumen_check_rows.argtypes = [i32, i64, i64]
    lib.lumen_check_rows.restype = i32
    lib.lumen_decode_row.argtypes = [i32, ptr, i64, i64, ptr]
    lib.lumen_decode_row.restype = i32
    lib.lumen_qmatmul.argtypes = [i32, ptr, i64, i64, i64, ptr, i64, i64, ptr, i64, i32]
    lib.lumen_qmatmul.restype = i32
    lib.lumen_paged_attention_rows.argtypes = [ptr, i64, ptr, ptr, i32, ptr, i64, ptr, ptr, ptr, i64,
                                               i32, i32, i32, i32, ctypes.c_float, ptr, i64, i32,
                                               i64, i64, i64, i64]
    lib.lumen_paged_attention_rows.restype = i32
    f32 = ctypes.c_float
    lib.lumen_add_rms_norm.argtypes = [ptr, i64, ptr, i64, i64, i64, ptr, f32, ptr, i64]
    lib.lumen_add_rms_norm.restype = None
    lib.lumen_rope_store.argtypes = [ptr, i64, i64, i32, i32, i32, i32, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64]
    lib.lumen_rope_store.restype = i32
    lib.lumen_check_positions_slots.argtypes = [ptr, ptr, i64, i64, i64]
    lib.lumen_check_positions_slots.restype = i32
    lib.lumen_silu_mul.argtypes = [ptr, i64, i64, i64, ptr, i64]
    lib.lumen_silu_mul.restype = None
    lib.lumen_layer_forward.argtypes = [ctypes.POINTER(LayerStruct), ctypes.POINTER(StepStruct), ptr]
    lib.lumen_layer_forward.restype = i32
    return lib


def available() -> bool:
    try:
        library()
    except NativeUnavailable:
        return False
    return True


# A whole decoder layer in one call (layer.c). The structures mirror layer.h field for field.
_i64, _i32 = ctypes.c_int64, ctypes.c_int32


class LinearStruct(ctypes.Structure):
    _fields_ = [("parts", _i32), ("qtype", _i32 * 3), ("w", ctypes.c_void_p * 3), ("row_bytes", _i64 * 3),
                ("n", _i64 * 3)]


class LayerStruct(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("qkv", LinearStruct),
                ("wo", LinearStruct), ("gate_up", LinearStruct), ("down", LinearStruct),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


class StepStruct(ctypes.Structure):
    _fields_ = [("rows", _i64), ("dim", _i64), ("ffn", _i64), ("nq", _i32), ("nkv", _i32), ("hd", _i32),
                ("rope_dim", _i32), ("block_size", _i32), ("nthreads", _i32), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float)] + [(name, ctypes.c_void_p) for name in (
                    "x", "h", "qkv", "attn", "out", "gate_up", "act", "positions", "slots", "cos", "sin",
                    "block_tables")] + [("ldbt", _i64)] + [(name, ctypes.c_void_p) for name in (
                        "attn_rows", "attn_seqs", "attn_ctx")] + [(name, _i64) for name in (
                            "rope_positions", "num_blocks", "n_seqs", "table_width")]
