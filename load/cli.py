"""`lumen bench`: the argument parser and command of the load generator.

service/cli.py mounts these; this module never imports the server side.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from lumen.load.generator import LoadConfig, run_load
from lumen.load.prompts import BUILTIN_PROMPTS, load_prompts
from lumen.load.report import format_summary

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_REQUESTS = 64


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to an argparse subparsers object; return its parser."""
    p = subparsers.add_parser(
        "bench", help="load a running server with concurrent Generate streams",
        description="Drive concurrent Generate streams against a server; report throughput, "
                    "TTFT, inter-token and end-to-end latency percentiles and errors by status.")
    p.add_argument("--server", default=DEFAULT_TARGET, help="host:port of the server")
    p.add_argument("--concurrency", type=int, default=16, help="streams kept in flight")
    p.add_argument("--requests", type=int, default=None,
                   help=f"measured requests (default {DEFAULT_REQUESTS}; with --duration, a cap)")
    p.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                   help="start requests until this many seconds have passed")
    p.add_argument("--max-tokens", type=int, default=64, help="max_new_tokens of each request")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="one prompt per line, or .jsonl with prompt and optional max_new_tokens "
                        "(default: built-in story openings)")
    p.add_argument("--model", default="", help="model name (default: the server's default model)")
    p.add_argument("--temperature", type=float, default=None, help="unset: the server's default")
    p.add_argument("--ignore-eos", action="store_true", help="always generate max-tokens tokens")
    p.add_argument("--seed", type=int, default=None, help="request i uses seed + i")
    p.add_argument("--deadline", type=float, default=60.0, metavar="SECONDS", help="per-request deadline")
    p.add_argument("--warmup", type=int, default=0, metavar="N", help="unrecorded requests sent first")
    p.add_argument("--output", default="bench-result.json", metavar="PATH", help="the JSON result file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    """The LoadConfig the flags describe; ValueError says which flag is wrong."""
    requests = args.requests
    if requests is None and args.duration is None:
        requests = DEFAULT_REQUESTS
    prompts = load_prompts(args.prompts) if args.prompts else list(BUILTIN_PROMPTS)
    return LoadConfig(
        concurrency=args.concurrency, requests=requests, duration_s=args.duration,
        max_new_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=args.ignore_eos,
        seed=args.seed, deadline_s=args.deadline, warmup_requests=args.warmup, model=args.model,
        prompts=prompts, prompt_source=args.prompts or "builtin")


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the load; 0 when every request succeeded, 1 when some failed, 2 on bad flags."""
    try:
        config = config_from_args(args)
    except (ValueError, OSError) as err:
        print(f"lumen bench: {err}", file=sys.stderr)
        return 2
    progress = not args.no_progress and sys.stderr.isatty()
    result = asyncio.run(run_load(args.server, config, progress))
    result.write_json(args.output)
    print(format_summary(result))
    print(f"  result written to {args.output}")
    return 0 if all(r.ok for r in result.records) else 1
