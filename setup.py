"""Lumen's build: every top-level folder installs under the one `lumen` namespace, and the gRPC
stubs (`lumen.v1`) are generated from proto/ as part of the build.

The folders a reader knows the project by (`engine/`, `service/`, `telemetry/`, `load/`) become
`lumen.engine`, `lumen.service`, `lumen.telemetry` and `lumen.load`; nothing is installed as a
top-level `engine` or `service`. Metadata and dependencies are in pyproject.toml.

The C kernels (engine/native/csrc) are compiled here too, once per instruction-set level of this
architecture (engine/native/build.py says which), as extension files that setuptools places in the
package (for an editable install, next to their sources) and that tag the wheel for this platform.
Without a working C compiler the install stops with a message saying how to get one.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
FOLDERS = {"lumen.engine": "engine", "lumen.service": "service", "lumen.telemetry": "telemetry",
           "lumen.load": "load"}
PROTO = Path("proto") / "lumen" / "v1" / "inference.proto"
STUBS = Path("lumen") / "v1"


def packages() -> list[str]:
    names = ["lumen", "lumen.v1"]
    for name, folder in FOLDERS.items():
        names += [name] + [f"{name}.{sub}" for sub in find_packages(str(HERE / folder))]
    return names


def generate_stubs() -> None:
    """proto/lumen/v1/inference.proto -> lumen/v1/inference_pb2{,_grpc}.py(i), when missing or stale."""
    proto, out = HERE / PROTO, HERE / STUBS / "inference_pb2.py"
    if out.exists() and out.stat().st_mtime >= proto.stat().st_mtime:
        return
    try:
        from grpc_tools import protoc  # noqa: F401 (a build requirement; named here for the error below)
    except ImportError as exc:
        raise SystemExit("building Lumen needs grpcio-tools to generate the gRPC stubs: "
                         "pip install grpcio-tools (pip does this itself unless --no-build-isolation)") from exc
    (HERE / STUBS).mkdir(parents=True, exist_ok=True)
    (HERE / STUBS / "__init__.py").touch()
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iproto", "--python_out=.", "--pyi_out=.",
                    "--grpc_python_out=.", str(PROTO)], cwd=HERE, check=True)


def native_build():
    """engine/native/build.py, loaded by its path: it needs only the standard library, and Lumen
    is not installed yet."""
    spec = importlib.util.spec_from_file_location("lumen_native_build", HERE / "engine" / "native" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module         # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


NATIVE = native_build()
CSRC = Path("engine") / "native" / "csrc"


def kernel_extensions() -> list[Extension]:
    sources = [str(CSRC / name) for name in NATIVE.SOURCES]
    depends = [str(CSRC / name) for name in NATIVE.HEADERS]
    exts = [Extension(f"lumen.engine.native.{NATIVE.PROBE_MODULE}", [str(CSRC / NATIVE.PROBE_SOURCE)])]
    return exts + [Extension(f"lumen.engine.native.{v.module}", sources, depends=depends)
                   for v in NATIVE.variants()]


class BuildKernels(build_ext):
    """Compiles the kernel libraries with build.py's flags (plain shared libraries loaded through
    ctypes, not Python modules), all the variants' sources in parallel."""

    def build_extensions(self) -> None:
        cc = NATIVE.compiler()
        try:
            NATIVE.compiler_version(cc)
        except NATIVE.BuildError as exc:
            raise SystemExit(f"error: {exc}") from exc
        by_module = {v.module: v for v in NATIVE.variants()}
        targets = {}
        for ext in self.extensions:
            path = Path(self.get_ext_fullpath(ext.name))
            module = ext.name.rsplit(".", 1)[1]
            if module == NATIVE.PROBE_MODULE:
                NATIVE.build_probe(path, cc, HERE / CSRC)
            else:
                targets[path] = NATIVE.BASE_FLAGS + by_module[module].flags
        print(f"building the C kernels ({', '.join(by_module)}) with {cc}: a minute or two", flush=True)
        try:
            NATIVE.build_libraries(targets, cc, HERE / CSRC)
        except NATIVE.BuildError as exc:
            raise SystemExit(f"error: {exc}") from exc


# Before setup(): setuptools checks that every package's folder exists as soon as it reads the
# package list (and the build requirements, grpcio-tools included, are installed by then).
generate_stubs()
setup(packages=packages(), package_dir={"lumen": "lumen", **FOLDERS}, ext_modules=kernel_extensions(),
      cmdclass={"build_ext": BuildKernels})
