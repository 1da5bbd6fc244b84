"""`lumen chat`: one question, or a conversation typed turn by turn, against a running server.

The history lives here, in the client: each turn sends the whole conversation so far in one
Chat call, and the server renders it with the model's chat template. A failed turn (a bad
request, a cancelled call) is reported and left out of the history; the session goes on.
"""
from __future__ import annotations

import argparse
import sys

import grpc

from lumen.service.client import apply_request_options, connect, end_stream, show, traced_generate
from lumen.v1 import inference_pb2 as pb


def _request(args: argparse.Namespace, history: list[tuple[str, str]], template: str) -> pb.ChatRequest:
    req = pb.ChatRequest(model=args.model, chat_template=template,
                         messages=[pb.ChatMessage(role=r, content=c) for r, c in history])
    apply_request_options(req, args)
    return req


def _turn(args: argparse.Namespace, history: list[tuple[str, str]], template: str, stub) -> str:
    """Ask the server for the assistant's next turn, streaming it to stdout; return its text."""
    summary = traced_generate(args.server, _request(args, history, template), on_text=show,
                              timeout=args.timeout, stub=stub)
    end_stream(summary)
    return summary.text


def run_chat(args: argparse.Namespace) -> int:
    template = args.chat_template.read_text(encoding="utf-8") if args.chat_template else ""
    start: list[tuple[str, str]] = [("system", args.system)] if args.system else []
    stub = connect(args.server)
    if args.question is not None:
        _turn(args, start + [("user", args.question)], template, stub)
        return 0
    history = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history at the prompt)
        except ImportError:
            pass
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            history = list(start)
            continue
        if not text.strip():
            continue
        try:
            reply = _turn(args, history + [("user", text)], template, stub)
        except grpc.RpcError as err:
            print(f"lumen: {err.code().name}: {err.details()}", file=sys.stderr)
            continue
        history += [("user", text), ("assistant", reply)]
