"""`lumen`: serve models, or talk to a running server (generate, tokenize, models)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import grpc

from load.cli import add_bench_parser, cmd_bench

DEFAULT_TARGET = "127.0.0.1:50051"
# engine.speculative.SpecMethod's values, spelled out so that parsing arguments does not import torch.
SPEC_METHODS = ("none", "ngram", "draft", "layer_skip")
MAX_SPECULATIVE_TOKENS = 16


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


def _model_spec(text: str) -> tuple[str | None, Path]:
    name, sep, path = text.partition("=")
    return (name, Path(path)) if sep and name and "/" not in name else (None, Path(text))


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve GGUF or Hugging Face models over gRPC")
    p.add_argument("--model", action="append", type=_model_spec, metavar="[NAME=]PATH",
                   help="a GGUF file or a Hugging Face Llama directory to serve (repeatable; the first is "
                        "the default). Without it, the embedded demo model is written to the cache and served.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of weights and activations")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
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
    p.add_argument("--log-level", default="INFO")
    _speculative_options(p)


def _speculative_options(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("speculative decoding")
    s.add_argument("--speculative", choices=SPEC_METHODS, default="none",
                   help="the method of requests that do not choose one: ngram (prompt lookup), draft "
                        "(--draft-model), layer_skip (the model's first layers)")
    s.add_argument("--num-speculative-tokens", type=_int_in_range(1, MAX_SPECULATIVE_TOKENS), default=4,
                   metavar="K", help="draft tokens per step for requests that do not set it")
    s.add_argument("--draft-model", type=Path, metavar="PATH",
                   help="a small GGUF with the default model's vocabulary, for the 'draft' method")
    s.add_argument("--layer-skip-layers", type=_int_in_range(1), default=None, metavar="N",
                   help="layers of the 'layer_skip' draft (default: a quarter of the model)")
    s.add_argument("--speculative-max-batch", type=_int_in_range(0), default=4, metavar="N",
                   help="no speculation in steps with more decoding requests than this")


def _client_parsers(sub) -> None:
    g = sub.add_parser("generate", help="stream a completion from a running server")
    g.add_argument("prompt")
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
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--no-special-tokens", action="store_true", help="do not add BOS")
    g.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    g.add_argument("--speculative", choices=SPEC_METHODS, default=None, metavar="METHOD",
                   help=f"speculative decoding method ({', '.join(SPEC_METHODS)}); default: the server's")
    g.add_argument("--num-speculative-tokens", type=_int_in_range(1, MAX_SPECULATIVE_TOKENS), default=None,
                   metavar="K", help="draft tokens per step; default: the server's")
    t = sub.add_parser("tokenize", help="tokenize text with a served model's tokenizer")
    t.add_argument("text")
    t.add_argument("--server", default=DEFAULT_TARGET)
    t.add_argument("--model", default="")
    m = sub.add_parser("models", help="list the served models")
    m.add_argument("--server", default=DEFAULT_TARGET)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lumen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _client_parsers(sub)
    add_bench_parser(sub)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from engine.engine import EngineConfig
    from engine.scheduler import SchedulerConfig
    from engine.speculative import SpecMethod, SpeculativeConfig
    from service.loading import load_models, load_with_progress
    from service.server import ServerConfig, ServerConfigError, run_server
    from telemetry import setup_telemetry

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.speculative == "draft" and args.draft_model is None:  # refused before any model is loaded
        raise ServerConfigError("--speculative draft needs a draft model: add --draft-model PATH "
                                "(a small GGUF with the served model's vocabulary)")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ServerConfig(
        models=args.model or [], host=args.host, port=args.port, dtype=getattr(torch, args.dtype),
        engine=EngineConfig(
            scheduler=SchedulerConfig(max_running=args.max_running, max_tokens_per_step=args.max_tokens_per_step,
                                      max_waiting=args.max_waiting),
            default_max_new_tokens=args.default_max_tokens, kv_cache_bytes=args.kv_cache_memory,
            block_size=args.block_size, prefix_caching=not args.no_prefix_caching,
            speculative=SpeculativeConfig(
                method=SpecMethod(args.speculative), num_tokens=args.num_speculative_tokens,
                layer_skip_layers=args.layer_skip_layers, max_batch=args.speculative_max_batch)),
        draft_model=args.draft_model)
    loaded = load_models(config.models, config.dtype)
    draft = load_with_progress(config.draft_model, config.dtype) if config.draft_model else None
    asyncio.run(run_server(config, setup_telemetry(), loaded, draft))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lumen.v1 import inference_pb2 as pb
    from service.client import connect, stream_generate

    req = pb.GenerateRequest(model=args.model, prompt=args.prompt)
    if args.no_special_tokens:
        req.add_special_tokens = False
    if args.max_tokens is not None:
        req.stopping.max_new_tokens = args.max_tokens
    req.stopping.stop.extend(args.stop)
    req.stopping.ignore_eos = args.ignore_eos
    s = req.sampling
    for field, value in (("temperature", args.temperature), ("top_p", args.top_p),
                         ("repetition_penalty", args.repetition_penalty), ("seed", args.seed)):
        if value is not None:
            setattr(s, field, value)
    s.top_k, s.min_p = args.top_k, args.min_p
    if args.speculative is not None:
        req.speculative.method = args.speculative
    if args.num_speculative_tokens is not None:
        req.speculative.num_tokens = args.num_speculative_tokens

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    summary = stream_generate(connect(args.server), req, on_text=show, timeout=args.timeout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(f"[{summary.line()}]", file=sys.stderr)
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from lumen.v1 import inference_pb2 as pb
    from service.client import connect

    resp = connect(args.server).Tokenize(pb.TokenizeRequest(model=args.model, text=args.text))
    for token_id, piece in zip(resp.token_ids, resp.pieces):
        print(f"{token_id}\t{piece!r}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from lumen.v1 import inference_pb2 as pb
    from service.client import connect

    for m in connect(args.server).ListModels(pb.ListModelsRequest()).models:
        mark = " (default)" if m.is_default else ""
        print(f"{m.name}{mark}: {m.architecture} {m.file_type}, {m.parameter_count:,} parameters, "
              f"context {m.context_length}, vocab {m.vocab_size}, {m.path}")
    return 0


COMMANDS = {"serve": cmd_serve, "generate": cmd_generate, "tokenize": cmd_tokenize, "models": cmd_models,
            "bench": cmd_bench}


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
        from engine.errors import LumenError
        if isinstance(exc, (LumenError, OSError)):
            print(f"lumen: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
