"""`lumen adapter load|unload|list`: a running server's LoRA adapters, over its gRPC API."""
from __future__ import annotations

import argparse

from lumen.v1 import inference_pb2 as pb


def add_adapter_parser(sub, default_target: str) -> None:
    a = sub.add_parser("adapter", help="load, unload or list a running server's LoRA adapters")
    actions = a.add_subparsers(dest="action", required=True)
    load = actions.add_parser("load", help="load an adapter (a path on the server) under a name")
    load.add_argument("name")
    load.add_argument("path", help="a GGUF LoRA adapter or a PEFT directory, as the server sees it")
    unload = actions.add_parser("unload", help="unload an adapter (refused while requests use it)")
    unload.add_argument("name")
    listing = actions.add_parser("list", help="the loaded adapters")
    for p in (load, unload, listing):
        p.add_argument("--server", default=default_target)
        p.add_argument("--model", default="", help="the served model (default: the server's default)")


def show(a: pb.AdapterInfo) -> str:
    return (f"{a.model}/{a.name}: {a.format} rank {a.rank}, alpha {a.alpha:g}, {', '.join(a.targets)}; "
            f"{a.path}, {a.size_bytes / 2**20:.1f} MiB, {a.active_requests} active")


def cmd_adapter(args: argparse.Namespace) -> int:
    from lumen.service.client import connect
    stub = connect(args.server)
    if args.action == "load":
        print("loaded", show(stub.LoadAdapter(pb.LoadAdapterRequest(model=args.model, name=args.name,
                                                                      path=args.path))))
    elif args.action == "unload":
        print("unloaded", show(stub.UnloadAdapter(pb.UnloadAdapterRequest(model=args.model, name=args.name))))
    else:
        for a in stub.ListAdapters(pb.ListAdaptersRequest(model=args.model)).adapters:
            print(show(a))
    return 0
