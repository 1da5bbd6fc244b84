"""Build and run the gRPC server: Inference, Health and reflection on one port."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lumen.engine.core.async_engine import DEFAULT_STREAM_BUFFER_TOKENS, AsyncEngine
from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
from lumen.engine.errors import LumenError
from lumen.engine.native import library as native_library
from lumen.engine.speculative import SpecMethod
from lumen.engine.weights.loaded_model import LoadedModel
from lumen.service.handlers import add_inference_service
from lumen.service.limits import RequestLimits
from lumen.service.loading import in_passing_thread
from lumen.service.registry import ModelRegistry, ModelRuntime
from lumen.service.servicer import InferenceService
from lumen.telemetry import StepMetrics, Telemetry
from lumen.telemetry.step_metrics import observe_device_memory
from lumen.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name


@dataclass(slots=True)
class ServerConfig:
    models: list[tuple[str | None, Path]]  # (name or None for the file stem, path)
    host: str = "127.0.0.1"
    port: int = 50051
    dtype: torch.dtype = torch.float32
    engine: EngineConfig = field(default_factory=EngineConfig)
    draft_model: Path | None = None  # speculative draft for the default model
    capture_content: bool = False    # record prompt and completion text in the spans (opt-in)
    limits: RequestLimits = field(default_factory=RequestLimits)
    stream_buffer_tokens: int = DEFAULT_STREAM_BUFFER_TOKENS  # undelivered tokens before a request is held
    allow_slow_kernels: bool = False  # serve even where the C kernels have no vector path (check_kernels)
    loras: list[tuple[str, Path]] = field(default_factory=list)   # LoRA adapters of the default model


class ServerConfigError(LumenError):
    """The server's options cannot work together (e.g. a draft model with another vocabulary)."""


def start_runtime(model: LoadedModel, config: EngineConfig, telemetry: Telemetry,
                  draft: LoadedModel | None = None,
                  stream_buffer_tokens: int = DEFAULT_STREAM_BUFFER_TOKENS,
                  loras: list[tuple[str, Path]] = ()) -> ModelRuntime:
    steps = StepMetrics(telemetry.meter, model.name)
    try:
        engine = LLMEngine(model, config, tracer=telemetry.tracer, on_step=steps.observe, draft=draft,
                           on_load=steps.observe_load)
    except ValueError as exc:  # the engine refuses these settings for this model (its message says why)
        raise ServerConfigError(f"cannot serve {model.name}: {exc}") from exc
    for name, path in loras:   # before the engine's thread starts
        try:
            loaded = engine.load_adapter(name, engine.lora.read(path))
        except LumenError as exc:
            raise ServerConfigError(f"--lora {name}={path}: {exc}") from exc
        log.info("model %s: LoRA adapter %s (%s, rank %d, %s) from %s", model.name, name, loaded.format,
                 loaded.rank, ", ".join(loaded.targets), path)
    runner = engine.runner
    steps.set_memory(runner.placement.device_name, runner.weights_bytes, runner.kv.nbytes)
    log.info("model %s: %s (%s, %s parameters) on %s", model.name, model.path, model.file_type,
             f"{model.parameter_count:,}", engine.runner.placement.describe())
    return ModelRuntime(model.name, model, AsyncEngine(engine, stream_buffer_tokens))


def build_registry(loaded: list[LoadedModel], config: EngineConfig, telemetry: Telemetry,
                   draft: LoadedModel | None = None,
                   stream_buffer_tokens: int = DEFAULT_STREAM_BUFFER_TOKENS,
                   loras: list[tuple[str, Path]] = ()) -> ModelRegistry:
    """One engine per model; the draft model and the startup LoRA adapters serve the default
    (first) one only."""
    runtimes: list[ModelRuntime] = []
    try:
        for i, model in enumerate(loaded):
            engine_config = config if i == 0 else _without_draft(config, model.name)
            runtimes.append(start_runtime(model, engine_config, telemetry, draft if i == 0 else None,
                                          stream_buffer_tokens, loras if i == 0 else ()))
        _observe_gpu_memory(telemetry, {rt.placement.device for rt in runtimes if rt.placement.on_cuda})
        return ModelRegistry(runtimes)
    except BaseException:
        for rt in runtimes:
            rt.engine.shutdown()
        raise


def _observe_gpu_memory(telemetry: Telemetry, devices: set) -> None:
    """lumen.device.memory.used for each GPU the models use (no GPU, no gauge)."""
    if not devices:
        return
    from lumen.engine.model.placement import cuda_memory

    observe_device_memory(telemetry.meter, lambda: [(str(device), state, value)
                                                    for device in sorted(devices, key=str)
                                                    for state, value in cuda_memory(device).items()])


def _without_draft(config: EngineConfig, name: str) -> EngineConfig:
    """A model other than the default has no draft model: its requests default to no speculation."""
    if config.speculative.method is not SpecMethod.DRAFT:
        return config
    log.warning("%s: the draft model serves the default model only; requests to %s do not speculate "
                "unless they choose another method", name, name)
    return dataclasses.replace(config, speculative=dataclasses.replace(config.speculative, method=SpecMethod.NONE))


class LumenServer:
    """A started server; `port` is the bound port (useful with port 0 in tests)."""

    def __init__(self, registry: ModelRegistry, telemetry: Telemetry, engine_config: EngineConfig,
                 capture_content: bool = False, limits: RequestLimits | None = None) -> None:
        self.registry = registry
        self.telemetry = telemetry
        # gRPC turns SO_REUSEPORT on by default: a second server on a port in use would then start
        # and take part of the connections. Off, binding a used port fails.
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self.health = health.aio.HealthServicer()
        self.servicer = InferenceService(registry, telemetry, engine_config.default_max_new_tokens, capture_content,
                                         limits)
        add_inference_service(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        try:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:  # grpc's "Failed to bind to address"
            raise OSError(f"cannot listen on {host}:{port}: the port is in use (or the address is not "
                          "this machine's); choose another with --port") from exc
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}: the port is in use (or the address is not "
                          "this machine's); choose another with --port")
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        self.servicer.stopping = True  # calls cut off from now on end UNAVAILABLE, as their clients see
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await asyncio.to_thread(self.registry.shutdown)
        await asyncio.to_thread(self.telemetry.shutdown)  # bounded (about 5 s) even with a dead collector


_LOGGED: set[str] = set()


def check_kernels(allow_slow: bool) -> None:
    """Say which build of the CPU kernels runs here. With no vector path at all (or no kernels),
    refuse unless allow_slow, and then warn: a server 10x slower than it should be is an explicit
    choice, never a silent fallback."""
    try:
        line = native_library.describe()
        vector = native_library.vector_isa()
    except native_library.NativeUnavailable as exc:
        line, vector = f"C kernels unavailable ({exc}): matmuls and attention run on torch's slower path", None
    if vector is None and not allow_slow:
        raise ServerConfigError(f"{line}. To serve anyway, start with --allow-slow-kernels")
    # `lumen serve` checks before loading its models and again when serving
    _log_once(logging.WARNING if vector is None else logging.INFO, line)


def _log_once(level: int, line: str) -> None:
    """Log a line once per process."""
    if line not in _LOGGED:
        _LOGGED.add(line)
        log.log(level, line)


def resolve_matmul_mode(mode: str) -> str:
    """The matmul mode the engines use for --matmul-mode, logged once (auto: what it takes per
    weight type on this CPU's kernel build)."""
    from lumen.engine.native.kernels import describe_auto
    _log_once(logging.INFO, f"matmul mode: {mode}" + (f" ({describe_auto()}: the faster per weight type on this "
                                                      "kernel build, as measured)" if mode == "auto" else ""))
    return mode


async def run_server(config: ServerConfig, telemetry: Telemetry, loaded: list[LoadedModel],
                     draft: LoadedModel | None = None) -> None:
    if config.engine.placement is None or config.engine.placement.kernels == "native":
        check_kernels(config.allow_slow_kernels)
    # The engines are built (KV pools filled) off the main thread: see loading.in_passing_thread.
    registry = in_passing_thread(build_registry, loaded, config.engine, telemetry, draft, config.stream_buffer_tokens,
                                 config.loras)
    server = LumenServer(registry, telemetry, config.engine, config.capture_content, config.limits)
    try:
        port = await server.start(config.host, config.port)
    except BaseException:
        await server.stop(0)  # the engines' threads and the exporters end with it
        raise
    names = ", ".join(rt.name for rt in registry)
    log.info("serving %s on %s:%d", names, config.host, port)
    print(f"lumen: serving {names} on {config.host}:{port} (Ctrl-C to stop)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("lumen: shutting down", flush=True)
    await server.stop()
