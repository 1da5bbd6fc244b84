"""run_load and `lumen bench` against the in-process stories260K server.

Synchronization comes from the RPCs themselves (every call is awaited to its
end); nothing sleeps.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket

import pytest_asyncio

from lumen.load.cli import add_bench_parser, cmd_bench
from lumen.load.generator import RESULT_SCHEMA, LoadConfig, build_request, run_load
from lumen.load.prompts import PromptSpec
from tests.service.conftest import start_harness


@pytest_asyncio.fixture
async def server(stories_model):
    harness = await start_harness(stories_model)
    yield harness
    await harness.close()


def greedy(**kw) -> LoadConfig:
    defaults = dict(concurrency=4, requests=8, max_new_tokens=16, temperature=0.0, ignore_eos=True, deadline_s=30)
    return LoadConfig(**(defaults | kw))


def max_in_flight(records) -> int:
    """The most requests whose [start, end) intervals overlap at one request's start."""
    spans = [(r.start_ms, r.start_ms + r.e2e_ms) for r in records]
    return max(sum(s <= start < e for s, e in spans) for start, _ in spans)


async def test_all_requests_succeed_with_per_token_timings(server, tmp_path):
    result = await run_load(server.target, greedy(), progress=False)
    assert [r.index for r in result.records] == list(range(8))
    for r in result.records:
        assert r.ok and r.error == "" and r.finish_reason == "length"
        assert r.completion_tokens == r.tokens_received == 16 and r.prompt_tokens > 1
        assert len(r.itl_ms) == r.completion_tokens - 1 and all(gap >= 0 for gap in r.itl_ms)
        assert 0 < r.ttft_ms <= r.e2e_ms
        assert re.fullmatch(r"[0-9a-f]{32}", r.trace_id)
    assert len({r.request_id for r in result.records}) == 8
    assert max_in_flight(result.records) == 4

    s = result.summary()
    assert (s["requests"], s["successful"], s["failed"], s["errors_by_status"]) == (8, 8, 0, {})
    assert s["completion_tokens"] == 128 and s["finish_reasons"] == {"length": 8}
    assert s["output_tokens_per_s"] == 128 / result.duration_s and s["requests_per_s"] == 8 / result.duration_s
    assert s["itl_ms"]["count"] == 8 * 15 and s["ttft_ms"]["count"] == s["e2e_ms"]["count"] == 8
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        d = s[key]
        assert d["p50"] <= d["p90"] <= d["p99"] <= d["max"], key

    path = tmp_path / "result.json"
    result.write_json(path)
    saved = json.loads(path.read_text())
    assert saved["schema"] == RESULT_SCHEMA and saved["target"] == server.target
    assert saved["config"]["concurrency"] == 4 and saved["config"]["max_new_tokens"] == 16
    assert saved["summary"] == json.loads(json.dumps(s))
    assert len(saved["requests"]) == 8 and saved["requests"][3]["itl_ms"] == result.records[3].itl_ms


async def test_no_server_reports_unavailable():
    # A bound socket that never listens: connections are refused, and no one else can take the port.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{sock.getsockname()[1]}"
        result = await run_load(target, greedy(concurrency=2, requests=4, deadline_s=10))
    assert [r.status for r in result.records] == ["UNAVAILABLE"] * 4
    s = result.summary()
    assert s["errors_by_status"] == {"UNAVAILABLE": 4} and s["successful"] == 0
    assert s["output_tokens_per_s"] == 0 and s["ttft_ms"] == {"count": 0, "mean": None, "p50": None,
                                                                "p90": None, "p99": None, "max": None}


async def test_bad_request_counts_invalid_argument(server):
    result = await run_load(server.target, greedy(requests=4, temperature=-1.0))
    assert result.summary()["errors_by_status"] == {"INVALID_ARGUMENT": 4}
    assert all("sampling.temperature" in r.error and r.ttft_ms is None for r in result.records)


async def test_warmup_and_per_prompt_max_tokens(server):
    prompts = [PromptSpec("Once upon a time", 4), PromptSpec("The cat sat", None)]
    config = greedy(concurrency=2, requests=4, warmup_requests=2, max_new_tokens=6, prompts=prompts)
    result = await run_load(server.target, config)
    assert [r.index for r in result.records] == [0, 1, 2, 3]  # warm-up requests are not recorded
    assert [r.completion_tokens for r in result.records] == [4, 6, 4, 6]
    assert [r.prompt_index for r in result.records] == [0, 1, 0, 1]


async def test_duration_keeps_every_worker_busy(server):
    result = await run_load(server.target, greedy(concurrency=3, requests=None, duration_s=0.05))
    assert len(result.records) >= 3 and all(r.ok for r in result.records)


def test_build_request_fields():
    config = LoadConfig(model="m", seed=5, max_new_tokens=9, ignore_eos=True,
                        prompts=[PromptSpec("a"), PromptSpec("b", 3)])
    req, prompt_index = build_request(config, 3)
    assert (req.model, req.prompt, prompt_index) == ("m", "b", 1)
    assert (req.stopping.max_new_tokens, req.stopping.ignore_eos, req.sampling.seed) == (3, True, 8)
    assert not req.sampling.HasField("temperature")  # unset: the server's default


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lumen")
    add_bench_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


async def test_cli_writes_result_and_prints_summary(server, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Once upon a time", "max_new_tokens": 5}\n{"prompt": "Lily"}\n')
    out = tmp_path / "bench.json"
    args = bench_args("--server", server.target, "--concurrency", "2", "--requests", "4", "--max-tokens", "7",
                      "--prompts", str(prompts), "--temperature", "0", "--ignore-eos", "--seed", "1",
                      "--output", str(out), "--no-progress")
    # cmd_bench runs its own event loop; the server keeps serving on this one meanwhile.
    assert await asyncio.to_thread(cmd_bench, args) == 0
    saved = json.loads(out.read_text())
    assert saved["summary"]["completion_tokens"] == 5 + 7 + 5 + 7
    assert saved["config"]["prompt_source"] == str(prompts)
    printed = capsys.readouterr().out
    assert "output token throughput" in printed and "TTFT" in printed and str(out) in printed


def test_cli_rejects_bad_flags(capsys):
    assert cmd_bench(bench_args("--concurrency", "0")) == 2
    assert "concurrency must be >= 1" in capsys.readouterr().err
