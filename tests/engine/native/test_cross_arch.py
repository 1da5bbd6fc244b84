"""The C kernels on aarch64, checked here: the sources cross-compiled with Debian's
gcc-aarch64-linux-gnu, with the aarch64 variant's flags, into a static check program
(cross/check_kernels.c) that runs under qemu-user and must reproduce this machine's bits for
every type's decoder and matmul, batched and row by row.

No ARM speed can be measured this way (qemu emulates). Needs `apt-get install
gcc-aarch64-linux-gnu qemu-user-static`; skipped with that reason when they are missing
(`make test-aarch64` runs just this file). The cross build is cached like the kernels' own
run-time builds, so it is compiled once per source version (about a minute)."""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from lumen.engine.cache_dir import default_cache_dir
from lumen.engine.native import build
from lumen.engine.native import kernels as native
from tests.engine.native.test_kernels import NATIVE_TYPES, random_weight

CROSS_CC = "aarch64-linux-gnu-gcc"
QEMU = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
CHECK = Path(__file__).with_name("cross") / "check_kernels.c"

pytestmark = [
    pytest.mark.skipif(platform.machine() in ("aarch64", "arm64"), reason="an aarch64 host runs the kernel tests itself"),
    pytest.mark.skipif(shutil.which(CROSS_CC) is None or QEMU is None,
                       reason="needs gcc-aarch64-linux-gnu and qemu-user-static (apt-get install them)"),
]


def cross_build() -> Path:
    """The static aarch64 check program, from this tree's sources with the armv8-a variant's flags."""
    (arm,) = build.ARM64
    flags = (*build.BASE_FLAGS, *arm.flags, f"-I{build.SOURCE_DIR}")
    version = subprocess.run([CROSS_CC, "--version"], capture_output=True, text=True, check=True).stdout
    h = hashlib.sha256(repr((build.build_id(flags), CHECK.read_bytes(), version)).encode())
    target = default_cache_dir() / "native" / f"check_kernels-aarch64-{h.hexdigest()[:16]}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.mkdir(exist_ok=True)
    try:
        sources = [CHECK] + [build.SOURCE_DIR / name for name in build.SOURCES]
        objects = [tmp / (s.name + ".o") for s in sources]
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            runs = [pool.submit(subprocess.run, [CROSS_CC, *flags, "-c", str(s), "-o", str(o)], capture_output=True,
                                text=True, check=False) for s, o in zip(sources, objects)]
            for done in (r.result() for r in runs):
                assert done.returncode == 0, f"cross-compiling failed:\n{done.stderr}"
        link = subprocess.run([CROSS_CC, "-static", "-fopenmp", *map(str, objects), "-o", str(tmp / "check"), "-lm"],
                              capture_output=True, text=True, check=False)
        assert link.returncode == 0, f"linking failed:\n{link.stderr}"
        os.replace(tmp / "check", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_cases(path: Path, rng: np.random.Generator) -> int:
    """Every native type: random rows, and this machine's decoded rows and matmul outputs (both modes)."""
    with path.open("wb") as f:
        for qtype in NATIVE_TYPES:
            n, k, m = 37, 512, 5
            w = random_weight(qtype, rng, n, k)
            x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
            y, y8 = torch.empty(m, n), torch.empty(m, n)
            native.qmatmul_into(int(qtype), w.raw, k, x, y)
            native.qmatmul_into(int(qtype), w.raw, k, x, y8, mode="int8")
            decoded = native.decode_rows(int(qtype), w.raw, k)
            f.write(np.int32(qtype).tobytes() + np.array([n, k, m, w.raw.shape[1]], np.int64).tobytes())
            for t in (w.raw, decoded, x, y, y8):
                f.write(t.contiguous().numpy().tobytes())
    return len(NATIVE_TYPES)


def test_aarch64_build_reproduces_this_machines_bits(tmp_path):
    program = cross_build()
    cases = write_cases(tmp_path / "cases.bin", np.random.default_rng(1234))
    done = subprocess.run([QEMU, str(program), str(tmp_path / "cases.bin")], capture_output=True, text=True,
                          timeout=240, check=False)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert f"{cases} of {cases} cases matched" in done.stdout
