"""Server memory held for clients that stop reading: N streams that never read, the server's
resident memory sampled while they sit there.

The clients give each HTTP/2 stream 1 KiB of window and no BDP probing, so they really stop
the server's writes (a default gRPC client takes megabytes into its own buffers first). The
server runs in a process of its own, so only its memory is measured. With `--base REV`, the
same load also runs against a server started from a git revision of before the namespace
(`python -m service.cli`), one after the other in the same run.

    .venv/bin/python bench/unread_streams.py --base 0666690 --streams 48 --tokens 1500 --top-logprobs 20
"""
from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from common import REPO, SHARED  # noqa: E402  (sets sys.path)

from lumen.v1 import inference_pb2 as pb  # noqa: E402
from lumen.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

SLOW_READER = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def measure(command: list[str], cwd: Path, args: argparse.Namespace) -> dict:
    server = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(re.search(r":(\d+) \(Ctrl-C", server.stdout.readline())[1])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=SLOW_READER) as channel:
            stub = pb_grpc.InferenceStub(channel)
            warm = pb.GenerateRequest(prompt="Once upon a time")
            warm.stopping.max_new_tokens = 4
            [m async for m in stub.Generate(warm)]
            before = resident_mib(server.pid)
            req = pb.GenerateRequest(prompt="Once upon a time", top_logprobs=args.top_logprobs)
            req.sampling.temperature = 0
            req.stopping.max_new_tokens, req.stopping.ignore_eos = args.tokens, True
            calls = [stub.Generate(req) for _ in range(args.streams)]
            started, peak = time.monotonic(), 0.0
            while time.monotonic() - started < args.seconds:
                await asyncio.sleep(0.5)
                peak = max(peak, resident_mib(server.pid) - before)
            for call in calls:
                call.cancel()
        return {"before_mib": before, "peak_growth_mib": peak}
    finally:
        server.terminate()
        server.wait()


def base_checkout(rev: str, dest: Path) -> Path:
    subprocess.run(["git", "worktree", "add", "--detach", str(dest), rev], cwd=REPO, check=True,
                   capture_output=True)
    shutil.copytree(REPO / "lumen" / "v1", dest / "lumen" / "v1")
    (dest / "lumen" / "__init__.py").touch()
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=SHARED / "models" / "stories260K.gguf")
    p.add_argument("--streams", type=int, default=48)
    p.add_argument("--tokens", type=int, default=1500)
    p.add_argument("--top-logprobs", type=int, default=0)
    p.add_argument("--seconds", type=float, default=16.0, help="how long the streams sit unread")
    p.add_argument("--base", help="also measure a server from this git revision (one before the namespace)")
    args = p.parse_args()
    serve = ["serve", "--model", str(args.model), "--port", "0", "--log-level", "WARNING"]
    rows = [("working tree", asyncio.run(measure([sys.executable, "-m", "lumen.service.cli", *serve], Path("/"),
                                                 args)))]
    if args.base:
        with tempfile.TemporaryDirectory() as tmp:
            dest = base_checkout(args.base, Path(tmp) / "base")
            try:
                rows.append((args.base, asyncio.run(measure([sys.executable, "-m", "service.cli", *serve], dest,
                                                            args))))
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(dest)], cwd=REPO, check=True)
    print(f"{args.streams} unread streams, {args.tokens} tokens, top_logprobs {args.top_logprobs}, "
          f"{args.seconds:g} s")
    print("| server | resident before | peak growth |\n| --- | --- | --- |")
    for label, row in rows:
        print(f"| {label} | {row['before_mib']:.0f} MiB | +{row['peak_growth_mib']:.1f} MiB |")


if __name__ == "__main__":
    main()
