"""How the C kernels are compiled: one library per instruction-set level, built when Lumen is installed.

`pip install .` (and so `make serve` / `make test`) compiles csrc/ once per variant of this
machine's architecture, through setup.py, into the package next to this file:

    x86_64   x86-64-v2 (SSE4.2: scalar code, the baseline), x86-64-v3 (AVX2 + FMA + F16C),
             x86-64-v4 (AVX-512 F/BW/CD/DQ/VL)
    aarch64  armv8-a (no hand-written NEON paths yet: the compiler's own vectorization)
    other    generic (the compiler's default target)

and a small probe (cpu.c, built for the architecture's baseline) that asks the CPU (cpuid on
x86) which levels it runs. library.py loads the best variant the probe allows, so a wheel or
image built on one machine runs correctly, and as fast as its CPU allows, on another.

Each library carries a build id: a digest of the sources it was compiled from and its flags
(`lumen_build_id()`). A checkout whose csrc/ changed after the install no longer matches, and
library.py builds the current sources into the cache directory instead of loading stale code.

This module uses the standard library only: setup.py runs it before Lumen is installed.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import platform
import subprocess
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().with_name("csrc")
PACKAGE_DIR = Path(__file__).resolve().parent
SOURCES = ("qmatmul.c", "q8matmul.c", "attention.c", "rowwise.c", "layer.c", "lora.c")
HEADERS = ("qmatmul.h", "decoders.h", "attention.h", "rowwise.h", "layer.h", "lora.h", "simd.h")
PROBE_SOURCE = "cpu.c"
# No implicit fused multiply-adds: the decoders are bit-exact with ggml's only unfused, and the
# matmul spells its fma out.
BASE_FLAGS = ("-O3", "-fPIC", "-std=gnu11", "-fopenmp", "-ffp-contract=off", "-Wall", "-Werror", "-Wno-psabi")


class BuildError(RuntimeError):
    """The C kernels could not be compiled (the message says why and what to do)."""


@dataclass(frozen=True)
class Variant:
    name: str               # also the `-march=` value, except "generic"
    level: int              # what cpu.c's lumen_cpu_level() must return at least for this CPU to run it
    flags: tuple[str, ...]  # added to BASE_FLAGS

    @property
    def module(self) -> str:
        """The file's stem inside lumen.engine.native (an extension-module name, so that setuptools
        builds it, copies it for editable installs and tags the wheel for this platform)."""
        return "_kernels_" + self.name.replace("-", "_")


X86 = (Variant("x86-64-v2", 2, ("-march=x86-64-v2", "-mtune=generic")),
       Variant("x86-64-v3", 3, ("-march=x86-64-v3", "-mtune=generic")),
       Variant("x86-64-v4", 4, ("-march=x86-64-v4", "-mtune=generic", "-mprefer-vector-width=512")))
ARM64 = (Variant("armv8-a", 0, ("-march=armv8-a",)),)
GENERIC = (Variant("generic", 0, ()),)
PROBE_MODULE = "_cpu"


def variants(machine: str | None = None) -> tuple[Variant, ...]:
    """The variants built for an architecture (this one by default), lowest level first."""
    machine = (machine or platform.machine()).lower()
    if machine in ("x86_64", "amd64"):
        return X86
    if machine in ("aarch64", "arm64"):
        return ARM64
    return GENERIC


def variant(name: str) -> Variant:
    for v in X86 + ARM64 + GENERIC:
        if v.name == name:
            return v
    raise ValueError(f"no kernel variant {name!r}; the variants are "
                     + ", ".join(v.name for v in X86 + ARM64 + GENERIC))


def ext_suffix() -> str:
    return sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def installed_path(module: str, package_dir: Path = PACKAGE_DIR) -> Path:
    return package_dir / (module + ext_suffix())


def build_id(flags: tuple[str, ...], source_dir: Path = SOURCE_DIR) -> str:
    """A digest of the sources and the flags: what a library built from them reports."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode() + b"\0" + (source_dir / name).read_bytes())
    h.update(repr(tuple(flags)).encode())
    return h.hexdigest()[:16]


def compiler() -> str:
    return os.environ.get("CC") or "cc"


def compiler_version(cc: str) -> str:
    """`cc --version`'s output, or a BuildError saying that there is no working compiler."""
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BuildError(
            f"Lumen's CPU kernels are C and are compiled when Lumen is installed, but there is no working C compiler "
            f"{cc!r} ({exc}). Install one (Debian/Ubuntu: apt-get install gcc libc6-dev; Fedora: dnf install gcc) "
            f"or set CC to one, then install again.") from exc


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BuildError(f"building the C kernels failed: {' '.join(cmd)}\n{done.stderr.strip()}")


def build_probe(target: Path, cc: str, source_dir: Path = SOURCE_DIR) -> None:
    """cpu.c for the architecture's baseline (no -march), so any CPU of it can ask."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        out = Path(tmp) / target.name
        _run([cc, "-O2", "-fPIC", "-shared", "-Wall", "-Werror", str(source_dir / PROBE_SOURCE), "-o", str(out)])
        os.replace(out, target)


def _commands(target: Path, flags: tuple[str, ...], cc: str, source_dir: Path, tmp: Path
              ) -> tuple[list[list[str]], list[str]]:
    """(compile commands, link command) for one library, its objects in tmp."""
    flags = (*flags, f'-DLUMEN_BUILD_ID="{build_id(flags, source_dir)}"')
    objects = [str(tmp / (target.stem + "-" + name + ".o")) for name in SOURCES]
    compiles = [[cc, *flags, "-c", str(source_dir / name), "-o", obj] for name, obj in zip(SOURCES, objects)]
    sanitize = [f for f in flags if f.startswith("-fsanitize")]
    return compiles, [cc, "-shared", "-fopenmp", *sanitize, *objects, "-o", str(tmp / target.name), "-lm"]


def build_libraries(targets: dict[Path, tuple[str, ...]], cc: str, source_dir: Path = SOURCE_DIR) -> None:
    """Compile SOURCES from source_dir into each target shared library with its flags (BASE_FLAGS
    and a -march); each library reports build_id(flags, source_dir). Every compilation runs in
    one pool, so the slow qmatmul.c of each variant overlap on a multi-core machine."""
    if not targets:
        return
    parent = next(iter(targets)).parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".build-") as tmp:
        plans = {target: _commands(target, flags, cc, source_dir, Path(tmp)) for target, flags in targets.items()}
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            for done in [pool.submit(_run, job) for compiles, _ in plans.values() for job in compiles]:
                done.result()
        for target, (_, link) in plans.items():
            _run(link)
            os.replace(link[-2], target)    # atomic: a racing build renames identical bytes


def build_all(package_dir: Path, cc: str | None = None, source_dir: Path = SOURCE_DIR,
              machine: str | None = None) -> list[Path]:
    """The probe and every variant of this architecture, into package_dir (what setup.py runs)."""
    cc = cc or compiler()
    compiler_version(cc)
    probe = installed_path(PROBE_MODULE, package_dir)
    build_probe(probe, cc, source_dir)
    targets = {installed_path(v.module, package_dir): BASE_FLAGS + v.flags for v in variants(machine)}
    build_libraries(targets, cc, source_dir)
    return [probe, *targets]
