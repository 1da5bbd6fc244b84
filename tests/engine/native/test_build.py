"""How the C kernels are built and chosen: at install time, one library per instruction-set level,
the best one this CPU runs loaded at run time, stale or missing builds never loaded silently, and
every variant this CPU can execute passing the kernel tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lumen.engine.native import build, library

REPO = Path(__file__).resolve().parents[3]
NATIVE_TESTS = Path(__file__).resolve().parent


@pytest.fixture
def fresh_library():
    library.library.cache_clear()
    yield library
    library.library.cache_clear()


def test_every_variant_of_this_architecture_is_installed():
    """`pip install` compiled them all (setup.py), with the probe, next to library.py."""
    for module in [build.PROBE_MODULE] + [v.module for v in build.variants()]:
        assert build.installed_path(module).is_file(), f"{module} was not built at install time"


def test_every_source_and_header_enters_the_build_id():
    """A file left out of SOURCES or HEADERS is missed by the build id, so an installed library
    built before that file changed would still be loaded (lora.h was missed so once)."""
    assert set(build.SOURCES) | {build.PROBE_SOURCE} == {p.name for p in build.SOURCE_DIR.glob("*.c")}
    assert set(build.HEADERS) == {p.name for p in build.SOURCE_DIR.glob("*.h")}


def test_the_best_variant_this_cpu_runs_is_loaded(fresh_library):
    level = library.cpu_level()
    best = [v for v in build.variants() if v.level <= level][-1]
    if "LUMEN_NATIVE_VARIANT" not in os.environ:
        assert library.selected() == best
    lib = library.library()
    assert lib.lumen_variant == library.selected()
    assert lib.lumen_build_id().decode() == build.build_id(library.flags(lib.lumen_variant))


def test_the_probe_agrees_with_the_kernel_flags_linux_reports():
    """cpu.c reads cpuid; Linux's /proc/cpuinfo flags come from it too (x86 only)."""
    if build.variants() != build.X86:
        pytest.skip("x86-64 levels only")
    flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split())
    v4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags
    v3 = {"avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm"} <= flags
    assert library.cpu_level() == (4 if v4 and v3 else 3 if v3 else 2)


@pytest.mark.parametrize("level,expected", [(4, "x86-64-v4"), (3, "x86-64-v3"), (2, "x86-64-v2")])
def test_selection_follows_the_cpu_level(monkeypatch, level, expected):
    monkeypatch.delenv("LUMEN_NATIVE_VARIANT", raising=False)
    monkeypatch.setattr(library, "cpu_level", lambda: level)
    monkeypatch.setattr(build, "variants", lambda machine=None: build.X86)
    assert library.selected().name == expected


def test_a_variant_this_cpu_cannot_run_is_refused(monkeypatch, fresh_library):
    monkeypatch.setattr(library, "cpu_level", lambda: 3)
    monkeypatch.setattr(build, "variants", lambda machine=None: build.X86)
    monkeypatch.setenv("LUMEN_NATIVE_VARIANT", "x86-64-v4")
    with pytest.raises(library.NativeUnavailable, match="this CPU runs only x86-64-v2, x86-64-v3"):
        library.library()
    monkeypatch.setenv("LUMEN_NATIVE_VARIANT", "x86-64-v9")
    with pytest.raises(library.NativeUnavailable, match="no kernel variant 'x86-64-v9'"):
        library.library()
    monkeypatch.setattr(library, "cpu_level", lambda: 1)
    monkeypatch.delenv("LUMEN_NATIVE_VARIANT")
    with pytest.raises(library.NativeUnavailable, match="runs none of the built kernel variants"):
        library.library()


def test_a_missing_build_is_an_error_saying_how_to_install(monkeypatch, fresh_library, tmp_path):
    """Not built behind the user's back at first use: the message says to install with a compiler."""
    monkeypatch.setattr(build, "PACKAGE_DIR", tmp_path)
    monkeypatch.setattr(build, "installed_path",
                        lambda module, package_dir=tmp_path: tmp_path / (module + build.ext_suffix()))
    library.cpu_level.cache_clear()
    try:
        with pytest.raises(library.NativeUnavailable, match=r"not built .* install it with a C compiler"):
            library.library()
        assert not library.available()
    finally:
        library.cpu_level.cache_clear()


@pytest.mark.skipif(os.environ.get("LUMEN_NATIVE_SANITIZE") == "1",
                    reason="a sanitizer run (make sanitize) always builds its own library into the cache")
def test_changed_sources_are_built_once_into_the_cache_and_logged(monkeypatch, fresh_library, tmp_path, caplog):
    """An editable checkout whose csrc/ changed after the install: the installed library's build id
    no longer matches, so the current sources are built (logged, it takes a minute), not the old loaded."""
    v = library.selected()
    installed = build.installed_path(v.module)
    built: list[Path] = []

    def copy_build(target: Path, flags, cc, source_dir=build.SOURCE_DIR) -> None:   # the real build, copied
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(installed.read_bytes())
        built.append(target)

    real_id = build.build_id
    monkeypatch.setattr(build, "build_id", lambda flags, source_dir=build.SOURCE_DIR: "changed-" + real_id(flags)[:8])
    monkeypatch.setenv("LUMEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(library, "_build", copy_build)
    with caplog.at_level("WARNING", logger="lumen.engine.native.library"):
        lib = library.library()
    assert "sources changed since Lumen was installed" in caplog.text and str(tmp_path) in caplog.text
    assert len(built) == 1 and built[0].parent == tmp_path / "native" and lib._name == str(built[0])
    library.library.cache_clear()
    library.library()
    assert len(built) == 1, "the cached build is reused"


def test_no_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(build.BuildError, match=r"no working C compiler .*no-such-compiler.* apt-get install gcc"):
        build.compiler_version(build.compiler())
    with pytest.raises(library.NativeUnavailable, match="no-such-compiler"):
        library._cache_build("x", build.BASE_FLAGS, build.compiler())


@pytest.mark.skipif(os.environ.get("LUMEN_NATIVE_SANITIZE") == "1", reason="not under the sanitizers' preload")
def test_installing_without_a_compiler_fails_with_that_message(tmp_path):
    """setup.py's build step, as pip runs it, with CC pointing nowhere: a clear error, no traceback."""
    env = {**os.environ, "CC": str(tmp_path / "no-such-compiler")}
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                           "--build-temp", str(tmp_path / "tmp")], cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert "no working C compiler" in done.stderr and "apt-get install gcc" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("name,isa", [("x86-64-v2", "none"), ("x86-64-v3", "AVX2"), ("x86-64-v4", "AVX-512"),
                                      ("armv8-a", "none"), ("generic", "none")])
def test_each_variant_reports_its_vector_paths(name, isa):
    v = build.variant(name)
    if v not in build.variants() or v.level > library.cpu_level():
        pytest.skip(f"{name} is not built for or not executable on this CPU")
    lib = library.load(build.installed_path(v.module))
    assert lib.lumen_vector_isa().decode() == isa


@pytest.mark.skipif("LUMEN_NATIVE_VARIANT" in os.environ, reason="already a run of one variant")
@pytest.mark.skipif(os.environ.get("LUMEN_NATIVE_SANITIZE") == "1", reason="make sanitize checks one variant")
def test_every_other_variant_this_cpu_runs_passes_the_kernel_tests():
    """The kernel tests (bit-exact decoding, matmuls against float64, batch invariance, boundary
    checks) once more for each built variant below the one this CPU gets, in a subprocess each."""
    others = [v for v in library.runnable() if v != library.selected()]
    if not others:
        pytest.skip("this CPU runs only one variant")
    for v in others:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                               str(NATIVE_TESTS)], cwd=REPO, env={**os.environ, "LUMEN_NATIVE_VARIANT": v.name},
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"{v.name}:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}"
        assert " passed" in done.stdout.splitlines()[-1]


def test_the_avx2_build_computes_the_avx512_builds_exponentials(monkeypatch):
    """Softmax and SiLU take e^x from exp16 in AVX-512 builds and from exp8, the same operations on
    8 lanes, in AVX2 builds: the same bits over the whole float range, subnormal results included."""
    from lumen.engine.native import kernels
    libs = {v.name: library.load(build.installed_path(v.module)) for v in library.runnable()
            if v.name in ("x86-64-v3", "x86-64-v4")}
    if len(libs) < 2:
        pytest.skip("needs a CPU that runs both the AVX2 and the AVX-512 builds")
    gen = torch.Generator().manual_seed(3)
    g = torch.cat([torch.linspace(-120, 120, 4001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 87.3, -87.3, 88.5, -88.5]),
                   torch.randn(391, generator=gen) * 30])           # 4400 = 275 x 16: no scalar tail
    h = torch.cat([g, torch.randn(g.numel(), generator=gen)]).view(1, -1)
    q = torch.randn(3, 4, 32, generator=gen) * 4
    k_cache, v_cache = torch.randn(2, 5, 16, 2, 32, generator=gen) * 4   # 5 blocks of 16
    args = (torch.tensor([[0, 1, 2, 3, 4]], dtype=torch.int32), torch.arange(3), torch.zeros(3, dtype=torch.int32),
            torch.tensor([80, 37, 1], dtype=torch.int32), 0.3)
    outs = {}
    for name, lib in libs.items():
        monkeypatch.setattr(kernels, "library", lambda lib=lib: lib)
        silu, attn = torch.empty(1, g.numel()), torch.empty_like(q)
        kernels.silu_mul(h, silu)
        kernels.paged_attention_rows(q, k_cache, v_cache, *args, attn)
        outs[name] = (silu, attn)
    (s3, a3), (s4, a4) = outs["x86-64-v3"], outs["x86-64-v4"]
    assert torch.equal(s3.view(torch.int32), s4.view(torch.int32)), "SiLU differs between the builds"
    assert torch.equal(a3.view(torch.int32), a4.view(torch.int32)), "attention differs between the builds"


def test_every_build_computes_the_same_int8_products(monkeypatch):
    """The int8 matmul mode is one defined arithmetic (q8matmul.c): the scalar build, the AVX2
    build and the AVX-512 build give the same bits for every type with integer kernels, including
    activations with NaN, infinities, zeros, subnormals and huge values (where NaN comes out, in the
    same places)."""
    import numpy as np
    from gguf import GGMLQuantizationType as T

    from lumen.engine.native import kernels
    from tests.engine.native.test_kernels import random_weight
    libs = {v.name: library.load(build.installed_path(v.module)) for v in library.runnable()}
    if len(libs) < 2:
        pytest.skip("this CPU runs one kernel build only")
    rng = np.random.default_rng(11)
    cases = []
    for qtype in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K):
        w = random_weight(qtype, rng, 13, 768)
        cases += [(qtype, w, torch.from_numpy(rng.standard_normal((m, 768)).astype(np.float32))) for m in (1, 2, 5, 9)]
        odd = torch.from_numpy(rng.standard_normal((4, 768)).astype(np.float32))
        odd[0, 5], odd[0, 40], odd[1, 9] = float("nan"), float("inf"), float("-inf")
        odd[2, :64], odd[2, 70:74] = 0.0, 1e-40                  # zero groups and subnormals
        odd[3] *= 1e30
        cases.append((qtype, w, odd))
        runs = torch.from_numpy(10.0 ** -rng.integers(0, 5, (5, 96, 1))).float().expand(5, 96, 8).reshape(5, 768)
        uneven = torch.from_numpy(rng.standard_normal((5, 768)).astype(np.float32)) * runs   # small multipliers
        cases += [(qtype, w, uneven[:1].contiguous()), (qtype, w, uneven)]
    cases = [(int(qtype), w.raw, x, qtype.name) for qtype, w, x in cases]
    for qtype, w, x, name in list(cases):     # Q4_0, Q4_1 interleaved: 8 rows a register, then 5 rows of the file's
        if qtype in kernels.X8:
            raw = w.clone()
            kernels.interleave(raw, qtype, 768, True)
            cases.append((kernels.X8[qtype], raw, x, name + " interleaved"))
    outs = {}
    for name, lib in libs.items():
        monkeypatch.setattr(kernels, "library", lambda lib=lib: lib)
        outs[name] = []
        for qtype, raw, x, _ in cases:
            y = torch.empty(x.shape[0], 13)
            kernels.qmatmul_into(qtype, raw, 768, x, y, mode="int8")
            outs[name].append(y)
    first, *others = outs
    for name in others:
        for (_, _, x, what), a, b in zip(cases, outs[first], outs[name]):
            same = (a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())
            assert bool(same.all()), f"{what}, {x.shape[0]} rows: {first} != {name}"
