"""The ghz configs in load/ghz/ are valid ghz settings whose data builds real GenerateRequests
(ChatRequests for the Chat configs).

ghz itself cannot run here, so each file is checked the way ghz reads it: the
JSON keys of its config struct, a Go duration for timeouts, a call that names a
server-streaming method, and data objects (templates rendered) that parse into
GenerateRequest with the proto's own field names.
"""
from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from lumen.v1 import inference_pb2 as pb

GHZ_DIR = Path(__file__).resolve().parents[2] / "load" / "ghz"
CONFIGS = sorted(GHZ_DIR.glob("*.json"))
# The keys of ghz's runner.Config that these files may use.
GHZ_KEYS = {"name", "host", "call", "insecure", "concurrency", "total", "connections", "timeout",
            "connect-timeout", "data", "duration", "max-duration", "metadata", "tags", "format", "output"}
GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|ms|s|m|h))+$")
# Sample values for ghz's call template data; an unknown action fails the test.
TEMPLATE_VALUES = {".RequestNumber": "7", ".WorkerID": "g0c0w3", ".UUID": str(uuid.uuid4())}
TEMPLATE = re.compile(r"\{\{\s*(.*?)\s*\}\}")


def load(name: str) -> dict:
    return json.loads((GHZ_DIR / name).read_text())


def data_items(config: dict) -> list[dict]:
    data = config["data"]
    return data if isinstance(data, list) else [data]


def render(value):
    """ghz renders each data object as a Go template before parsing it."""
    if isinstance(value, dict):
        return {k: render(v) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v) for v in value]
    if isinstance(value, str):
        return TEMPLATE.sub(lambda m: TEMPLATE_VALUES[m.group(1)], value)
    return value


def assert_field_names(obj: dict, descriptor: Descriptor, where: str) -> None:
    """Keys are the proto's field names (not only names ParseDict would also accept)."""
    for key, value in obj.items():
        assert key in descriptor.fields_by_name, f"{where}: {key!r} is not a field of {descriptor.name}"
        field = descriptor.fields_by_name[key]
        if field.type == FieldDescriptor.TYPE_MESSAGE and isinstance(value, dict):
            assert_field_names(value, field.message_type, f"{where}.{key}")


def test_the_three_configs_exist():
    assert {"generate-short.json", "generate-long.json", "generate-mixed.json"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid_ghz(path):
    config = json.loads(path.read_text())
    assert set(config) <= GHZ_KEYS, f"unknown ghz keys: {set(config) - GHZ_KEYS}"
    # No proto or protoset: ghz then resolves the call through server reflection.
    assert "proto" not in config and "protoset" not in config
    assert config["host"] == "127.0.0.1:50051" and config["insecure"] is True
    package, service, method = config["call"].rsplit(".", 2)
    assert package == pb.DESCRIPTOR.package
    assert pb.DESCRIPTOR.services_by_name[service].methods_by_name[method].server_streaming
    for key in ("timeout", "connect-timeout"):
        assert GO_DURATION.match(config[key]), f"{key}={config[key]!r} is not a Go duration"
    assert 1 <= config["concurrency"] <= config["total"]


def request_type(config: dict):
    """The request message of the config's call (GenerateRequest or ChatRequest)."""
    _, service, method = config["call"].rsplit(".", 2)
    descriptor = pb.DESCRIPTOR.services_by_name[service].methods_by_name[method].input_type
    return getattr(pb, descriptor.name)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_data_builds_requests(path):
    config = json.loads(path.read_text())
    message = request_type(config)
    for i, item in enumerate(data_items(config)):
        rendered = render(item)
        assert_field_names(rendered, message.DESCRIPTOR, f"{path.name} data[{i}]")
        req = json_format.ParseDict(rendered, message())
        assert (req.messages if message is pb.ChatRequest else req.prompt) and req.stopping.HasField("max_new_tokens")


def test_chat_config_renders_with_smollm2s_template(smollm2_model):
    from lumen.engine.chat.prompt import chat_prompt_ids
    from lumen.engine.chat.template import ChatTemplate

    template = ChatTemplate(smollm2_model.chat_template)
    for item in data_items(load("chat-short.json")):
        req = json_format.ParseDict(render(item), pb.ChatRequest())
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        ids = chat_prompt_ids(smollm2_model.tokenizer, template, messages)
        assert len(ids) + req.stopping.max_new_tokens <= smollm2_model.config.context_length


def test_short_and_long_shapes():
    short, long_ = load("generate-short.json"), load("generate-long.json")
    assert (short["concurrency"], short["total"]) == (16, 256)
    assert all(d["stopping"]["max_new_tokens"] == 32 for d in data_items(short))
    assert long_["concurrency"] == 8
    assert all(d["stopping"]["max_new_tokens"] == 128 for d in data_items(long_))
    assert min(len(d["prompt"]) for d in data_items(long_)) > 4 * max(len(d["prompt"]) for d in data_items(short))


def test_mixed_has_several_prompts_and_lengths():
    items = data_items(load("generate-mixed.json"))
    assert len({d["prompt"] for d in items}) >= 4
    assert len({d["stopping"]["max_new_tokens"] for d in items}) >= 4


def test_prompts_fit_the_stories_context(stories_model):
    """Every request is servable by stories260K: prompt (with BOS) plus new tokens fit its context."""
    context = stories_model.config.context_length
    for path in CONFIGS:
        if request_type(json.loads(path.read_text())) is not pb.GenerateRequest:
            continue
        for item in data_items(json.loads(path.read_text())):
            req = json_format.ParseDict(render(item), pb.GenerateRequest())
            prompt_len = len(stories_model.tokenizer.encode(req.prompt, add_special_tokens=True))
            assert prompt_len + req.stopping.max_new_tokens <= context, (path.name, req.prompt[:40])
