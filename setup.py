"""Lumen's build: every top-level folder installs under the one `lumen` namespace, and the gRPC
stubs (`lumen.v1`) are generated from proto/ as part of the build.

The folders a reader knows the project by (`engine/`, `service/`, `telemetry/`, `load/`) become
`lumen.engine`, `lumen.service`, `lumen.telemetry` and `lumen.load`; nothing is installed as a
top-level `engine` or `service`. Metadata and dependencies are in pyproject.toml.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

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


# Before setup(): setuptools checks that every package's folder exists as soon as it reads the
# package list (and the build requirements, grpcio-tools included, are installed by then).
generate_stubs()
setup(packages=packages(), package_dir={"lumen": "lumen", **FOLDERS})
