"""`lumen`: serve models, or talk to a running server (generate, chat, tokenize, models, adapter)."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import grpc

from lumen.load.cli import add_bench_parser, cmd_bench
from lumen.service.adapter_cli import add_adapter_parser, cmd_adapter

DEFAULT_TARGET = "127.0.0.1:50051"
# lumen.engine.core.async_engine's default, spelled out so that parsing arguments does not import torch.
DEFAULT_STREAM_BUFFER_TOKENS = 256
# engine.speculative.SpecMethod's values, spelled out so that parsing arguments does not import torch.
SPEC_METHODS = ("none", "ngram", "draft", "layer_skip", "auto")
MAX_SPECULATIVE_TOKENS = 16
# The variable OpenTelemetry's GenAI instrumentations read for the same opt-in.
CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
SDK_METRICS_ENV = "OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED"


UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'512MiB' -> 536870912; plain numbers are bytes."""
    number = text.rstrip("bBkKmMgGiI")
    unit = text[len(number):].lower()
    if unit not in UNITS or not number:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512MiB, 4GiB or 1000000")
    return int(float(number) * UNITS[unit])


def _int_in_range(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            span = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value
    return parse


def _float_where(holds, span: str):
    """A float argument type: a number for which holds(value), else "must be {span}"."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not holds(value):
            raise argparse.ArgumentTypeError(f"must be {span}, got {text}")
        return value
    return parse


_float_at_least_0 = _float_where(lambda v: v >= 0, ">= 0")
_fraction = _float_where(lambda v: 0 < v <= 1, "in (0, 1]")   # a share


def _model_spec(text: str) -> tuple[str | None, Path]:
    name, sep, path = text.partition("=")
    return (name, Path(path)) if sep and name and "/" not in name else (None, Path(text))


def _lora_spec(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=PATH (a GGUF LoRA adapter or a PEFT directory)")
    return name, Path(path)


def _lora_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA adapters (requests choose one with their `adapter` field)")
    g.add_argument("--lora", action="append", type=_lora_spec, default=[], metavar="NAME=PATH",
                   help="an adapter of the default model to load at startup (repeatable): a GGUF LoRA adapter "
                        "(llama.cpp's convert_lora_to_gguf.py) or a PEFT directory; LoadAdapter loads more "
                        "while serving")
    g.add_argument("--max-loras", type=_int_in_range(1, 1024), default=8, metavar="N",
                   help="adapters loaded at once, per model")
    g.add_argument("--max-lora-rank", type=_int_in_range(1, 4096), default=64, metavar="R",
                   help="the largest rank an adapter may have")


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve GGUF or Hugging Face models over gRPC")
    p.add_argument("--model", action="append", type=_model_spec, metavar="[NAME=]PATH",
                   help="a GGUF file or a Hugging Face Llama directory to serve (repeatable; the first is "
                        "the default). Without it, the embedded demo model is written to the cache and served.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="activations' and KV cache's dtype (auto: float32 on the CPU, bfloat16 on a GPU)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="where the models compute (auto: CUDA when torch sees a GPU, else the CPU)")
    p.add_argument("--kernels", choices=["auto", "native", "triton"], default="auto",
                   help="which kernels compute: native (the C kernels, CPU) or triton (CUDA; on --device cpu "
                        "only under TRITON_INTERPRET=1, for tests); auto: triton on CUDA, native on the CPU")
    p.add_argument("--enforce-eager", action="store_true",
                   help="on a GPU, run every step's kernels one by one instead of replaying CUDA graphs of "
                        "decode steps (slower; for debugging and comparison)")
    p.add_argument("--gpu-memory-utilization", type=_fraction, default=0.9, metavar="FRACTION",
                   help="on a GPU, the share of its memory the weights, activations and KV cache may use; the KV "
                        "cache gets what is left (--kv-cache-memory applies to the CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--matmul-mode", choices=["auto", "exact", "int8"], default="auto",
                   help="how the C kernels multiply quantized weights: exact (float32 on the exactly decoded "
                        "weights; greedy output equals a float64 reference), int8 (8-bit activations and "
                        "integer dot products, as llama.cpp; logits at least as close to exact as llama.cpp's) or auto (per weight "
                        "type, the faster of the two on this CPU's kernel build, as measured: int8 on AVX2; on "
                        "AVX-512 int8 for Q4_0 and Q4_1, exact for the rest)")
    p.add_argument("--max-running", type=int, default=16, help="requests computed together in one engine step")
    p.add_argument("--max-tokens-per-step", type=int, default=512,
                   help="token budget of one engine step (decodes plus prefill chunks)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests queued beyond the running ones; past it Generate fails with RESOURCE_EXHAUSTED")
    p.add_argument("--kv-cache-memory", type=parse_bytes, default="1GiB",
                   help="memory budget of the paged KV cache, e.g. 512MiB or 4GiB")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not reuse cached prompt prefixes")
    p.add_argument("--default-max-tokens", type=int, default=256,
                   help="max_new_tokens of requests that do not set it (clipped to the context)")
    _limit_options(p)
    p.add_argument("--allow-slow-kernels", action="store_true",
                   help="serve even where the C kernels have no vector path for this CPU (scalar code, "
                        "8-20x slower) or could not be loaded (torch's path); logged as a warning")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-format", choices=["json", "text"], default="json",
                   help="json: one object per line with trace_id/span_id; text: the classic line")
    _tracing_options(p)
    _speculative_options(p)
    _lora_options(p)


def _limit_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("limits on requests and slow clients")
    g.add_argument("--max-prompt-bytes", type=parse_bytes, default="1MiB", metavar="SIZE",
                   help="largest prompt (and Tokenize text) accepted, checked before tokenizing")
    g.add_argument("--max-stop-sequences", type=_int_in_range(1), default=16, metavar="N",
                   help="stop strings one request may set (each at most 256 characters)")
    g.add_argument("--stream-buffer-tokens", type=_int_in_range(1), default=DEFAULT_STREAM_BUFFER_TOKENS,
                   metavar="N", help="undelivered tokens (top-logprob alternatives included) a stream may "
                                     "hold before its request waits for the client to read")
    g.add_argument("--stream-write-timeout", type=_float_at_least_0, default=60.0, metavar="SECONDS",
                   help="cancel a stream whose client accepts no message for this long (0: never)")


def _tracing_options(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("tracing (exporters, endpoints and sampling: the standard OTEL_* variables)")
    t.add_argument("--trace-content", action=argparse.BooleanOptionalAction,
                   default=os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower() == "true",
                   help="record prompt and completion text in the text_completion span (off by default: "
                        f"they may hold personal data; {CAPTURE_CONTENT_ENV}=true also turns it on)")
    t.add_argument("--step-span-interval", type=_float_at_least_0, default=0.1, metavar="SECONDS",
                   help="at most one engine step per interval becomes an engine_step span linking the "
                        "requests it served (0: every step)")


def _speculative_options(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("speculative decoding")
    s.add_argument("--speculative", choices=SPEC_METHODS, default="none",
                   help="the method of requests that do not choose one: ngram (prompt lookup), draft "
                        "(--draft-model), layer_skip (the model's first layers), auto (n-gram when the "
                        "request's text offers a match, plain decoding otherwise)")
    s.add_argument("--num-speculative-tokens", type=_int_in_range(1, MAX_SPECULATIVE_TOKENS), default=4,
                   metavar="K", help="draft tokens per step for requests that do not set it")
    s.add_argument("--draft-model", type=Path, metavar="PATH",
                   help="a small GGUF with the default model's vocabulary, for the 'draft' method")
    s.add_argument("--layer-skip-layers", type=_int_in_range(1), default=None, metavar="N",
                   help="layers of the 'layer_skip' draft (default: a quarter of the model)")
    s.add_argument("--speculative-max-batch", type=_int_in_range(0), default=4, metavar="N",
                   help="no speculation in steps with more decoding requests than this")
    s.add_argument("--adaptive-speculative-tokens", action="store_true",
                   help="adapt each request's draft length to its acceptance: 2 more after a fully accepted "
                        "draft, 1 fewer otherwise, between 1 and its K")


def _client_parsers(sub) -> None:
    g = sub.add_parser("generate", help="stream a completion from a running server")
    g.add_argument("prompt")
    _request_options(g)
    g.add_argument("--no-special-tokens", action="store_true", help="do not add BOS")
    g.add_argument("--parse-special", action="store_true",
                   help="turn special-token text in the prompt (e.g. <|im_start|>) into the control token")
    c = sub.add_parser("chat", help="chat with a served model (its chat template): one question, or a "
                                    "conversation typed line by line")
    c.add_argument("question", nargs="?", help="ask this and exit; without it, read turns from the terminal "
                                               "(history kept; /reset starts over; Ctrl-D or /exit ends)")
    c.add_argument("--system", default=None, help="a system message first")
    c.add_argument("--chat-template", type=Path, default=None, metavar="FILE",
                   help="a Jinja chat template to use instead of the model's own")
    _request_options(c)
    t = sub.add_parser("tokenize", help="tokenize text with a served model's tokenizer")
    t.add_argument("text")
    t.add_argument("--server", default=DEFAULT_TARGET)
    t.add_argument("--model", default="")
    t.add_argument("--parse-special", action="store_true", help="special-token text becomes the control token")
    m = sub.add_parser("models", help="list the served models")
    m.add_argument("--server", default=DEFAULT_TARGET)


def _request_options(g: argparse.ArgumentParser) -> None:
    """What Generate and Chat share: the server, sampling, stopping and speculation."""
    g.add_argument("--server", default=DEFAULT_TARGET)
    g.add_argument("--model", default="")
    g.add_argument("--max-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[])
    g.add_argument("--stop-token-id", type=int, action="append", default=[], metavar="ID",
                   help="stop after this token (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--adapter", default="", metavar="NAME", help="a LoRA adapter loaded on the model")
    g.add_argument("--lora-scale", type=float, default=None, metavar="S",
                   help="multiplies the adapter's own scale (default 1)")
    g.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    g.add_argument("--speculative", choices=SPEC_METHODS, default=None, metavar="METHOD",
                   help=f"speculative decoding method ({', '.join(SPEC_METHODS)}); default: the server's")
    g.add_argument("--num-speculative-tokens", type=_int_in_range(1, MAX_SPECULATIVE_TOKENS), default=None,
                   metavar="K", help="draft tokens per step; default: the server's")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lumen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _client_parsers(sub)
    add_bench_parser(sub)
    add_adapter_parser(sub, DEFAULT_TARGET)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    from lumen.telemetry import setup_logging

    # The SDK counts the spans it drops (queue full, failed exports) only when asked; a server
    # should report them, so that is its default here (the user's setting still wins).
    added = SDK_METRICS_ENV not in os.environ
    os.environ.setdefault(SDK_METRICS_ENV, "true")
    logs = setup_logging(args.log_level, args.log_format)
    try:
        return _serve(args)
    finally:
        logs.shutdown()  # exports records still queued for OTLP, and gives the root logger back
        if added:  # the process may go on (tests call main()): leave its environment as it was
            del os.environ[SDK_METRICS_ENV]


def _serve(args: argparse.Namespace) -> int:
    import torch

    from lumen.engine.core.llm_engine import EngineConfig
    from lumen.engine.core.scheduler import SchedulerConfig
    from lumen.engine.lora.registry import LoraConfig
    from lumen.engine.model.placement import resolve_placement
    from lumen.engine.speculative import SpecMethod, SpeculativeConfig
    from lumen.service.loading import in_passing_thread, load_models, load_with_progress
    from lumen.service.server import ServerConfig, ServerConfigError, check_kernels, resolve_matmul_mode, run_server
    from lumen.telemetry import setup_telemetry

    if args.speculative == "draft" and args.draft_model is None:  # refused before any model is loaded
        raise ServerConfigError("--speculative draft needs a draft model: add --draft-model PATH "
                                "(a small GGUF with the served model's vocabulary)")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        placement = resolve_placement(args.device, args.kernels, args.dtype)
    except ValueError as exc:
        raise ServerConfigError(str(exc)) from None
    native = placement.kernels == "native"
    if native:
        check_kernels(args.allow_slow_kernels)   # before the models load: a refusal comes at once
    matmul_mode = resolve_matmul_mode(args.matmul_mode) if native else "exact"
    config = ServerConfig(
        models=args.model or [], host=args.host, port=args.port, dtype=placement.dtype,
        engine=EngineConfig(
            scheduler=SchedulerConfig(max_running=args.max_running, max_tokens_per_step=args.max_tokens_per_step,
                                      max_waiting=args.max_waiting),
            default_max_new_tokens=args.default_max_tokens, kv_cache_bytes=args.kv_cache_memory,
            step_span_interval_s=args.step_span_interval,
            block_size=args.block_size, prefix_caching=not args.no_prefix_caching, matmul_mode=matmul_mode,
            placement=placement, gpu_memory_utilization=args.gpu_memory_utilization,
            enforce_eager=args.enforce_eager,
            lora=LoraConfig(max_loras=args.max_loras, max_rank=args.max_lora_rank),
            speculative=SpeculativeConfig(
                method=SpecMethod(args.speculative), num_tokens=args.num_speculative_tokens,
                layer_skip_layers=args.layer_skip_layers, max_batch=args.speculative_max_batch,
                adaptive=args.adaptive_speculative_tokens)),
        draft_model=args.draft_model, capture_content=args.trace_content, loras=args.lora,
        limits=_limits(args),
        stream_buffer_tokens=args.stream_buffer_tokens, allow_slow_kernels=args.allow_slow_kernels)
    # Never on the main thread: see in_passing_thread.
    print(f"lumen: computing on {placement.describe()}", file=sys.stderr, flush=True)
    loaded = in_passing_thread(load_models, config.models, config.dtype, not native)
    draft = (in_passing_thread(load_with_progress, config.draft_model, config.dtype, None, not native)
             if config.draft_model else None)
    asyncio.run(run_server(config, setup_telemetry(), loaded, draft))
    return 0


def _limits(args: argparse.Namespace):
    from lumen.service.limits import RequestLimits
    from lumen.service.server import ServerConfigError

    try:
        return RequestLimits(max_prompt_bytes=args.max_prompt_bytes, max_stop_sequences=args.max_stop_sequences,
                             stream_write_timeout_s=args.stream_write_timeout)
    except ValueError as exc:
        raise ServerConfigError(f"bad limit: {exc}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from lumen.service.client import apply_request_options, end_stream, show, traced_generate
    from lumen.v1 import inference_pb2 as pb

    req = pb.GenerateRequest(model=args.model, prompt=args.prompt, parse_special=args.parse_special)
    if args.no_special_tokens:
        req.add_special_tokens = False
    apply_request_options(req, args)
    summary = traced_generate(args.server, req, on_text=show, timeout=args.timeout)
    end_stream(summary)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from lumen.service.chat_cli import run_chat

    return run_chat(args)


def cmd_tokenize(args: argparse.Namespace) -> int:
    from lumen.service.client import connect
    from lumen.v1 import inference_pb2 as pb

    resp = connect(args.server).Tokenize(pb.TokenizeRequest(model=args.model, text=args.text,
                                                            parse_special=args.parse_special))
    for token_id, piece in zip(resp.token_ids, resp.pieces):
        print(f"{token_id}\t{piece!r}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from lumen.service.client import connect
    from lumen.v1 import inference_pb2 as pb

    for m in connect(args.server).ListModels(pb.ListModelsRequest()).models:
        mark = " (default)" if m.is_default else ""
        print(f"{m.name}{mark}: {m.architecture} {m.file_type}, {m.parameter_count:,} parameters, "
              f"context {m.context_length}, vocab {m.vocab_size}, {m.path}; on {m.device} "
              f"({m.kernels} kernels, {m.dtype})")
        for a in m.adapters:
            print(f"  adapter {a.name}: {a.format} rank {a.rank}, alpha {a.alpha:g}, {', '.join(a.targets)}; "
                  f"{a.path}, {a.active_requests} active")
    return 0


COMMANDS = {"serve": cmd_serve, "generate": cmd_generate, "chat": cmd_chat, "tokenize": cmd_tokenize,
            "models": cmd_models, "bench": cmd_bench, "adapter": cmd_adapter}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except grpc.RpcError as err:
        print(f"lumen: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear one-line error for the CLI user, never a traceback dump
        from lumen.engine.errors import LumenError
        from lumen.telemetry import TelemetryConfigError
        if isinstance(exc, (LumenError, OSError, TelemetryConfigError)):
            print(f"lumen: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
