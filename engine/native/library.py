"""Lumen's C kernels for CPU: which of the built libraries runs here, loaded through ctypes.

`engine/native/csrc/` holds the sources: per-format block decoders (bit-exact with ggml), a
batch-invariant matmul that decodes a tile of weight rows once and multiplies it by every
activation row (see qmatmul.c), the decode attention over the paged KV cache (attention.c),
the row-wise work between a layer's matmuls (rowwise.c: RMSNorm, RoPE with the KV store, SiLU
gating), and a whole decoder layer chaining them in one call (layer.c).

They are compiled when Lumen is installed (build.py, run by setup.py), once per instruction-set
level of the architecture (x86-64-v2, v3 = AVX2, v4 = AVX-512; aarch64), and `library()` loads
the highest level this CPU runs, as cpu.c's probe reports it (cpuid). `LUMEN_NATIVE_VARIANT=NAME`
picks a lower one this CPU runs (the kernel tests run every such variant).

Two cases build at run time instead, into the cache directory (`$LUMEN_CACHE_DIR`, else
`$XDG_CACHE_HOME/lumen`, else `~/.cache/lumen`), named by a digest of sources, flags and compiler,
and logged, since they take a minute: an editable checkout whose csrc/ changed after the install
(the installed library's build id no longer matches its sources), and `LUMEN_NATIVE_SANITIZE=1`
(`make sanitize`: AddressSanitizer and UBSan). A library that is not installed is not built
behind the user's back: `library()` raises `NativeUnavailable` saying how to install it.

The library is linked with -fopenmp and resolves `libgomp.so.1` to the copy torch has
already loaded, so it shares torch's thread pool instead of starting a second one.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
from pathlib import Path

from lumen.engine.cache_dir import default_cache_dir
from lumen.engine.native import build
from lumen.engine.native.build import HEADERS, SOURCE_DIR, SOURCES, Variant  # noqa: F401 (bench/kernel_ab.py)

log = logging.getLogger(__name__)

# LUMEN_NATIVE_SANITIZE=1 builds (and caches apart) a library under AddressSanitizer and UBSan,
# for `make sanitize`; loading it needs the sanitizer runtimes preloaded (the Makefile does that).
# -O1: at -O3 the instrumented kernels take a quarter of an hour to compile on 2 cores.
SANITIZE_FLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer",
                  "-g")


class NativeUnavailable(RuntimeError):
    """The C kernels cannot be loaded here (the message says why and what to do)."""


def flags(v: Variant) -> tuple[str, ...]:
    """The compiler flags of variant v (with the sanitizers under LUMEN_NATIVE_SANITIZE=1)."""
    out = build.BASE_FLAGS + v.flags
    if os.environ.get("LUMEN_NATIVE_SANITIZE") == "1":
        out = tuple("-O1" if f == "-O3" else f for f in out) + SANITIZE_FLAGS
    return out


def _cache_build(name: str, flag_set: tuple[str, ...], cc: str) -> Path:
    """A library built at run time into the cache directory, named by a digest of what went in."""
    try:
        version = build.compiler_version(cc)
    except build.BuildError as exc:
        raise NativeUnavailable(str(exc)) from exc
    digest = hashlib.sha256(repr((build.build_id(flag_set), flag_set, version)).encode()).hexdigest()[:16]
    target = default_cache_dir() / "native" / f"lib{name}-{digest}.so"
    if not target.exists():
        log.warning("building the C kernels (%s) into %s (about a minute, once for these sources)", name, target.parent)
        try:
            _build(target, flag_set, cc)
        except build.BuildError as exc:
            raise NativeUnavailable(str(exc)) from exc
    return target


def _build(target: Path, flag_set: tuple[str, ...], cc: str, source_dir: Path = SOURCE_DIR) -> None:
    build.build_libraries({target: flag_set}, cc, source_dir)


@functools.cache
def cpu_level() -> int:
    """cpu.c's answer for this CPU: the highest x86-64 level it runs (1-4), 0 on other architectures."""
    path = build.installed_path(build.PROBE_MODULE)
    if not path.exists():
        raise NativeUnavailable(_not_installed(path))
    probe = ctypes.CDLL(str(path))
    probe.lumen_cpu_level.restype = ctypes.c_int
    return int(probe.lumen_cpu_level())


def runnable() -> list[Variant]:
    """The variants of this architecture that this CPU can execute, lowest first."""
    level = cpu_level()
    return [v for v in build.variants() if v.level <= level]


def selected() -> Variant:
    """The variant library() loads: LUMEN_NATIVE_VARIANT if set, else the best this CPU runs."""
    ok = runnable()
    if name := os.environ.get("LUMEN_NATIVE_VARIANT"):
        try:
            v = build.variant(name)
        except ValueError as exc:
            raise NativeUnavailable(f"LUMEN_NATIVE_VARIANT: {exc}") from exc
        if v not in ok:
            raise NativeUnavailable(f"LUMEN_NATIVE_VARIANT={name}: this CPU runs only "
                                    + (", ".join(x.name for x in ok) or "none of this architecture's variants"))
        return v
    if not ok:
        raise NativeUnavailable(f"this CPU (x86-64 level {cpu_level()}) runs none of the built kernel variants "
                                f"({', '.join(v.name for v in build.variants())}); the lowest needs SSE4.2 and POPCNT")
    return ok[-1]


def _not_installed(path: Path) -> str:
    return (f"the C kernels are not built ({path.name} is missing next to {Path(__file__).name}): they are compiled "
            "when Lumen is installed, so install it with a C compiler present (`make setup`, or `pip install .`)")


@functools.cache
def library() -> ctypes.CDLL:
    """The loaded kernel library: the selected variant as installed, or a run-time build of it
    when the sources changed since the install or the sanitizers are asked for."""
    v = selected()
    flag_set = flags(v)
    if os.environ.get("LUMEN_NATIVE_SANITIZE") == "1":
        lib = load(_cache_build(f"lumen_cpu-{v.name}-sanitize", flag_set, build.compiler()))
    else:
        path = build.installed_path(v.module)
        if not path.exists():
            raise NativeUnavailable(_not_installed(path))
        lib = load(path)
        if lib.lumen_build_id().decode() != build.build_id(flag_set):
            log.warning("the C kernels' sources changed since Lumen was installed; using a build of the current ones")
            lib = load(_cache_build(f"lumen_cpu-{v.name}", flag_set, build.compiler()))
    lib.lumen_variant = v
    return lib


def vector_isa() -> str | None:
    """The vector instruction set of the loaded kernels: "AVX-512" (every path), "AVX2" (some
    paths), or None (scalar code)."""
    isa = library().lumen_vector_isa().decode()
    return None if isa == "none" else isa


def describe() -> str:
    """One line for the server's log: which build of the C kernels runs here, and how fast."""
    lib = library()
    v, built = lib.lumen_variant, ", ".join(x.name for x in build.variants())
    head = f"C kernels: the {v.name} build (of {built}; this CPU runs up to x86-64 level {cpu_level()})" \
        if v.level else f"C kernels: the {v.name} build"
    isa = vector_isa()
    if isa == "AVX-512":
        return f"{head}, AVX-512 vector paths"
    if isa == "AVX2":
        return (f"{head}, AVX2 vector paths (8-lane: about half the AVX-512 build's speed on compute-bound "
                "work; Q2_K, Q3_K, Q5_0 and Q5_1 blocks decode with compiler-vectorized code)")
    return (f"{head}, no vector path: scalar code, 8-20x slower than llama.cpp on the same machine "
            "(BENCHMARKS.md, Machines)")


def load(path: Path) -> ctypes.CDLL:
    """A built kernel library with its functions' C signatures declared (bench/kernel_ab.py loads
    an older revision's build with it too)."""
    lib = ctypes.CDLL(str(path))
    for name in ("lumen_build_id", "lumen_vector_isa"):
        if hasattr(lib, name):         # (builds of sources older than these have neither)
            getattr(lib, name).restype, getattr(lib, name).argtypes = ctypes.c_char_p, []
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.lumen_block_layout.argtypes = [i32, ctypes.POINTER(i32), ctypes.POINTER(i32)]
    lib.lumen_block_layout.restype = i32
    lib.lumen_check_rows.argtypes = [i32, i64, i64]
    lib.lumen_check_rows.restype = i32
    lib.lumen_decode_row.argtypes = [i32, ptr, i64, i64, ptr]
    lib.lumen_decode_row.restype = i32
    lib.lumen_qmatmul.argtypes = [i32, ptr, i64, i64, i64, ptr, i64, i64, ptr, i64, i32]
    lib.lumen_qmatmul.restype = i32
    lib.lumen_qmatmul_int8.argtypes = lib.lumen_qmatmul.argtypes
    lib.lumen_qmatmul_int8.restype = i32
    lib.lumen_int8_type.argtypes, lib.lumen_int8_type.restype = [i32], i32
    lib.lumen_int8_check_rows.argtypes, lib.lumen_int8_check_rows.restype = [i32, i64, i64], i32
    lib.lumen_interleave.argtypes, lib.lumen_interleave.restype = [i32, ptr, i64, i64, i64, i32], i32
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
                ("n", _i64 * 3), ("int8", _i32)]


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
                            "rope_positions", "num_blocks", "n_seqs", "table_width")] + [("lora", ctypes.c_void_p)]


# LoRA adapters in a fused layer (lora.h).
LORA_TARGETS = 7


class LoraTargetStruct(ctypes.Structure):
    _fields_ = [("at", ctypes.c_void_p), ("bt", ctypes.c_void_p), ("r", _i64), ("col", _i64), ("n", _i64)]


class LoraLayerStruct(ctypes.Structure):
    _fields_ = [("t", LoraTargetStruct * LORA_TARGETS)]


class LoraStepStruct(ctypes.Structure):
    _fields_ = [("rows", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("adapters", ctypes.c_void_p),
                ("n_adapters", _i32), ("layers", _i32), ("layer", _i32)]
