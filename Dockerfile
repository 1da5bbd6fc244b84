# Lumen inference server image.
#
#   docker build -t lumen .                  # CPU torch
#   docker build -t lumen:cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cuXYZ .
#     (cuXYZ: a CUDA index that ships torch TORCH_VERSION for your driver)
#   docker run -p 50051:50051 -v "$PWD/models:/models" lumen --model /models/x.gguf
#   docker run --gpus all -p 50051:50051 -v "$PWD/models:/models" lumen:cuda --model /models/x.gguf
#     (a CUDA torch brings Triton; `lumen serve` then computes on the GPU: README, "Serving on a GPU")
#
# Telemetry is configured with the standard OTEL_* variables at `docker run`
# time (e.g. -e OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4317).
FROM python:3.11-slim

# The index decides the torch build: the CPU wheel by default, a CUDA one when
# pointed at a CUDA index. Installed before anything else so that no later
# dependency resolution pulls a different (multi-GB CUDA) torch from PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /app

# A C compiler: `pip install .` compiles the CPU kernels (one library per x86-64 level, or
# aarch64), and the image runs the best one its host's CPU supports.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# Copied after the slow layers above so a source edit rebuilds only this part. The build
# generates the gRPC stubs (lumen/v1) from proto/; lumen/v1 is in .dockerignore.
COPY pyproject.toml setup.py MANIFEST.in ./
COPY proto/ proto/
COPY lumen/__init__.py lumen/__init__.py
COPY engine/ engine/
COPY service/ service/
COPY telemetry/ telemetry/
COPY load/ load/
# torch is already satisfied, so this installs Lumen's other dependencies only.
# The check runs isolated (-I: no /app on sys.path) to prove the installed
# package, stubs included, imports, and that the entry point script exists.
RUN pip install . \
 && python -I -c "import lumen.v1.inference_pb2_grpc, lumen.service.cli" \
 && command -v lumen

RUN useradd --system --create-home --uid 10001 --shell /usr/sbin/nologin lumen \
 && mkdir -p /var/cache/lumen \
 && chown lumen:lumen /var/cache/lumen
ENV LUMEN_CACHE_DIR=/var/cache/lumen
USER lumen
# The kernels were compiled by the install; this loads the ones the build host gets and says which.
RUN python -I -c "from lumen.engine.native import library; print(library.describe())"
WORKDIR /home/lumen

EXPOSE 50051
# Arguments given to `docker run` (e.g. --model /models/x.gguf) are appended.
ENTRYPOINT ["lumen", "serve", "--host", "0.0.0.0", "--port", "50051"]
