"""LoRA adapters over gRPC: LoadAdapter / UnloadAdapter / ListAdapters, the `adapter` field of
Generate and Chat, every refusal with its status, and adapters loaded, used, unloaded and
reloaded while other requests stream (stories260K; PEFT-layout files written here)."""
from __future__ import annotations

import asyncio
import json
import threading

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
from lumen.engine.core.request import GenerationRequest
from lumen.engine.lora.adapter import TARGETS, target_shapes
from lumen.engine.sampling.sampler import SamplingParams
from lumen.telemetry import setup_telemetry
from lumen.v1 import inference_pb2 as pb
from tests.otlp_receiver import exporting_to_receiver
from tests.service.conftest import assert_still_serving, read_rest, start_harness

MODULES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}


def write_peft(path, cfg, rank: int, seed: int, targets=tuple(TARGETS), size: float = 0.3, **config):
    """A PEFT adapter directory (the layout peft's save_pretrained writes) with random A and B."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.n_layers):
        for t in targets:
            out, inp = target_shapes(cfg)[t]
            prefix = f"base_model.model.model.layers.{layer}.{MODULES[t]}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, inp, generator=g) * size
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=g) * size
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
        "target_modules": sorted({MODULES[t].split(".")[1] for t in targets}), **config}))
    return path


def greedy(prompt: str, n: int, adapter: str = "", **fields) -> pb.GenerateRequest:
    r = pb.GenerateRequest(prompt=prompt, adapter=adapter, **fields)
    r.sampling.temperature = 0
    r.stopping.max_new_tokens, r.stopping.ignore_eos = n, True
    return r


async def tokens(stub, req) -> list[int]:
    return [t async for m in stub.Generate(req) for t in m.token_ids]


async def code_of(awaitable) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await awaitable
    return err.value.code(), err.value.details()


async def test_load_list_generate_unload(stories_model, tmp_path, monkeypatch):
    path = write_peft(tmp_path / "tiny", stories_model.config, 4, seed=1)
    with exporting_to_receiver(monkeypatch) as receiver:
        telemetry = setup_telemetry()
        harness = await start_harness(stories_model, telemetry)
        try:
            info = await harness.stub.LoadAdapter(pb.LoadAdapterRequest(name="tiny", path=str(path)))
            assert (info.name, info.model, info.path, info.format, info.rank, info.alpha) == \
                ("tiny", "stories260K", "tiny", "peft", 4, 8.0)
            assert list(info.targets) == list(TARGETS) and info.size_bytes > 0
            listed = await harness.stub.ListAdapters(pb.ListAdaptersRequest())
            assert [a.name for a in listed.adapters] == ["tiny"]
            models = await harness.stub.ListModels(pb.ListModelsRequest())
            assert [a.name for a in models.models[0].adapters] == ["tiny"]
            base = await tokens(harness.stub, greedy("Once upon a time", 24))
            adapted = await tokens(harness.stub, greedy("Once upon a time", 24, "tiny"))
            half = await tokens(harness.stub, greedy("Once upon a time", 24, "tiny", lora_scale=0.5))
            assert len({tuple(base), tuple(adapted), tuple(half)}) == 3
            # What an engine of our own computes with the same file.
            engine = LLMEngine(stories_model, EngineConfig())
            engine.load_adapter("tiny", engine.lora.read(path))
            ids = stories_model.tokenizer.encode("Once upon a time", True, False)
            engine.add_request(GenerationRequest("x", ids, 24, SamplingParams(temperature=0), ignore_eos=True,
                                                 adapter="tiny"))
            want = []
            while engine.has_unfinished():
                want += [t for o in engine.step() for t in o.token_ids]
            assert adapted == want
            gone = await harness.stub.UnloadAdapter(pb.UnloadAdapterRequest(name="tiny"))
            assert gone.name == "tiny"
            assert not (await harness.stub.ListAdapters(pb.ListAdaptersRequest())).adapters
            await asyncio.to_thread(telemetry.force_flush)
            spans = await asyncio.to_thread(receiver.wait_for_spans, lambda s: sum(
                x.attributes.get("lumen.lora.adapter") == "tiny" for x in s) >= 4)
            metrics = await asyncio.to_thread(receiver.wait_for_metrics, lambda m: any(
                x.name == "lumen.requests" for x in m))
        finally:
            await harness.close()
    tagged = [s for s in spans if s.attributes.get("lumen.lora.adapter") == "tiny"]
    assert {s.kind for s in tagged} >= {"SERVER", "INTERNAL"}
    assert {s.attributes.get("gen_ai.request.model") for s in tagged if s.kind == "INTERNAL"} == {"stories260K"}
    assert metrics
    points = receiver.latest_metric("lumen.requests").points
    assert sum(p.value for p in points if p.attributes.get("lumen.lora.adapter") == "tiny") == 2
    assert sum(p.value for p in points if "lumen.lora.adapter" not in p.attributes) == 1


async def test_every_bad_call_gets_its_status_and_the_server_keeps_serving(stories_model, stories_path, tmp_path):
    cfg = stories_model.config
    good = write_peft(tmp_path / "good", cfg, 4, seed=2)
    wrong = write_peft(tmp_path / "wrong", cfg, 4, seed=3)
    tensors = load_file(wrong / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(cfg.dim + 8, 4)
    save_file(tensors, wrong / "adapter_model.safetensors")
    corrupt = write_peft(tmp_path / "corrupt", cfg, 4, seed=4)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    big = write_peft(tmp_path / "big", cfg, 128, seed=5)
    dora = write_peft(tmp_path / "dora", cfg, 4, seed=6, use_dora=True)
    harness = await start_harness(stories_model)
    stub = harness.stub
    try:
        await stub.LoadAdapter(pb.LoadAdapterRequest(name="good", path=str(good)))
        cases = [
            (pb.LoadAdapterRequest(name="x", path=str(tmp_path / "none")), grpc.StatusCode.INVALID_ARGUMENT,
             "no such file or directory"),
            (pb.LoadAdapterRequest(name="x", path=""), grpc.StatusCode.INVALID_ARGUMENT, "path: is empty"),
            (pb.LoadAdapterRequest(name="bad name", path=str(good)), grpc.StatusCode.INVALID_ARGUMENT,
             "is not an adapter name"),
            (pb.LoadAdapterRequest(name="good", path=str(good)), grpc.StatusCode.ALREADY_EXISTS, "already loaded"),
            (pb.LoadAdapterRequest(name="x", path=str(wrong)), grpc.StatusCode.INVALID_ARGUMENT,
             "do not fit the base model"),
            (pb.LoadAdapterRequest(name="x", path=str(corrupt)), grpc.StatusCode.INVALID_ARGUMENT,
             "not a readable safetensors file"),
            (pb.LoadAdapterRequest(name="x", path=str(big)), grpc.StatusCode.INVALID_ARGUMENT,
             "rank 128 is larger than this server's largest, 64"),
            (pb.LoadAdapterRequest(name="x", path=str(dora)), grpc.StatusCode.INVALID_ARGUMENT,
             "use_dora = True is not supported"),
            (pb.LoadAdapterRequest(name="x", path=str(stories_path)), grpc.StatusCode.INVALID_ARGUMENT,
             "is not a GGUF LoRA adapter"),
            (pb.LoadAdapterRequest(model="nope", name="x", path=str(good)), grpc.StatusCode.NOT_FOUND,
             "model 'nope' is not served here"),
        ]
        for req, code, text in cases:
            got, details = await code_of(stub.LoadAdapter(req))
            assert got == code and text in details, (req, got, details)
        got, details = await code_of(stub.UnloadAdapter(pb.UnloadAdapterRequest(name="x")))
        assert got == grpc.StatusCode.NOT_FOUND and "'x' is not loaded (loaded: good)" in details
        got, details = await code_of(tokens(stub, greedy("Once", 4, "x")))
        assert got == grpc.StatusCode.NOT_FOUND and "adapter 'x' is not loaded" in details
        got, details = await code_of(tokens(stub, greedy("Once", 4, "good", lora_scale=-1)))
        assert got == grpc.StatusCode.INVALID_ARGUMENT and "lora_scale: must be in [0, 10]" in details
        chat = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="hi")], adapter="x")
        got, _ = await code_of(stub.Chat(chat).read())
        assert got in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)  # no chat template here
        await assert_still_serving(harness)
        assert [a.name for a in (await stub.ListAdapters(pb.ListAdaptersRequest())).adapters] == ["good"]
    finally:
        await harness.close()


class HoldWhenDecoding:
    """Holds the engine thread before its first step in which all of `request_ids` are decoding
    (so each has delivered its first message), until `release` is set."""

    def __init__(self, llm: LLMEngine, request_ids: set[str]) -> None:
        self.llm, self.request_ids = llm, request_ids
        self.blocked, self.release = threading.Event(), threading.Event()
        self._step = llm.step
        llm.step = self.step

    def step(self, *args):
        decoding = {s.request_id for s in self.llm.scheduler.running if s.has_sampled}
        if self.request_ids <= decoding and not self.release.is_set():
            self.blocked.set()
            self.release.wait(timeout=60)
        return self._step(*args)


async def test_load_use_unload_reload_while_others_stream(stories_model, tmp_path):
    cfg = stories_model.config
    paths = {name: write_peft(tmp_path / name, cfg, 4, seed=10 + i) for i, name in enumerate(("a", "b"))}
    harness = await start_harness(stories_model)
    stub, llm = harness.stub, harness.llm
    N = 100   # long enough that every request is still decoding when the engine is held
    try:
        await stub.LoadAdapter(pb.LoadAdapterRequest(name="a", path=str(paths["a"])))
        solo = {name: await tokens(stub, greedy("Once upon a time", N, name)) for name in ("", "a")}
        await stub.LoadAdapter(pb.LoadAdapterRequest(name="b", path=str(paths["b"])))
        solo["b"] = await tokens(stub, greedy("Once upon a time", N, "b"))
        # Hold the engine once requests of every kind are decoding.
        gate = HoldWhenDecoding(llm, {"r", "ra", "rb"})
        calls = {name: stub.Generate(greedy("Once upon a time", N, name, request_id=f"r{name}"))
                 for name in ("", "a", "b")}
        firsts = {name: await call.read() for name, call in calls.items()}
        assert await asyncio.to_thread(gate.blocked.wait, 30)
        unload = asyncio.ensure_future(stub.UnloadAdapter(pb.UnloadAdapterRequest(name="a")))
        gate.release.set()
        got, details = await code_of(unload)
        assert got == grpc.StatusCode.FAILED_PRECONDITION and "in use by 1 request" in details
        outs = {name: list(firsts[name].token_ids) + [t for m in await read_rest(call) for t in m.token_ids]
                for name, call in calls.items()}
        assert outs == solo   # nobody saw another's adapter
        await stub.UnloadAdapter(pb.UnloadAdapterRequest(name="a"))
        streaming = stub.Generate(greedy("Once upon a time", N, "b"))
        first = await streaming.read()
        await stub.LoadAdapter(pb.LoadAdapterRequest(name="a", path=str(paths["a"])))   # while b streams
        rest = [t for m in await read_rest(streaming) for t in m.token_ids]
        assert list(first.token_ids) + rest == solo["b"]
        assert await tokens(stub, greedy("Once upon a time", N, "a")) == solo["a"]
        assert await asyncio.to_thread(harness.runtime.engine.wait_idle, 30)
        await harness.runtime.engine.call(lambda engine: engine.check_invariants())
        assert all(a.users == 0 for a in llm.lora.adapters())
    finally:
        await harness.close()


async def test_the_adapter_command(stories_model, tmp_path, capsys):
    from lumen.service.cli import main
    path = write_peft(tmp_path / "tiny", stories_model.config, 4, seed=1)
    harness = await start_harness(stories_model)
    try:
        server = ["--server", harness.target]
        assert await asyncio.to_thread(main, ["adapter", "load", "tiny", str(path), *server]) == 0
        assert "loaded stories260K/tiny: peft rank 4, alpha 8" in capsys.readouterr().out
        assert await asyncio.to_thread(main, ["adapter", "list", *server]) == 0
        assert capsys.readouterr().out.startswith("stories260K/tiny: peft rank 4")
        assert await asyncio.to_thread(main, ["adapter", "load", "tiny", str(path), *server]) == 1
        assert "ALREADY_EXISTS: adapter 'tiny' is already loaded" in capsys.readouterr().err
        assert await asyncio.to_thread(main, ["adapter", "unload", "tiny", *server]) == 0
        assert await asyncio.to_thread(main, ["adapter", "list", *server]) == 0
        assert capsys.readouterr().out == "unloaded stories260K/tiny: peft rank 4, alpha 8, attn_q, attn_k, attn_v, " \
                                          "attn_output, ffn_gate, ffn_up, ffn_down; tiny, 0.1 MiB, 0 active\n"
    finally:
        await harness.close()
