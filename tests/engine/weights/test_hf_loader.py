"""Loading a Hugging Face Llama directory: the same model as its GGUF file, and clear errors for bad ones.

The checkpoint is made once per session from stories260K.gguf by transformers (which undoes GGUF's
q/k permutation), so our HF-loaded model must reproduce our GGUF-loaded one exactly.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
from lumen.engine.core.request import GenerationRequest
from lumen.engine.errors import ModelLoadError
from lumen.engine.sampling.sampler import SamplingParams
from lumen.engine.weights.hf_loader import load_hf_dir
from lumen.engine.weights.model_files import load_model
from tests.engine.model.test_llama_reference import PROMPT, engine_logits

TEXTS = [
    "", " ", "  ", "   ", "\t", "\n", "\n\n", " \n \t ", "Hello", "hello world", " leading space",
    "trailing space ", "double  space", "Once upon a time, there was a little girl named Lily.",
    "She liked to play with her ball in the park!", "Tom said: \"Don't go!\"", "1234567890", "3.14159",
    "a-b_c/d\\e", "<s>", "</s>", "<unk>", "<0x41>", "▁", "▁▁x", "café", "naïve façade", "Ærøskøbing",
    "ß", "中文", "日本語のテキスト", "한국어", "Привет, мир", "مرحبا", "😀", "🦙 llama 🦙", "e\u0301",
    "\u200b", "\x00\x01\x7f", "tab\tand\nnewline", "MiXeD CaSe WORDS", "over-the-moon... yes?!",
]


def _patched_gguf(src: Path, dst: Path) -> Path:
    """A copy of `src` whose padding token is <unk> (transformers rejects GGUF's "no such token")."""
    from gguf import GGUFReader
    shutil.copyfile(src, dst)
    dst.chmod(0o644)
    reader = GGUFReader(dst, "r+")
    field = reader.fields["tokenizer.ggml.padding_token_id"]
    field.parts[field.data[0]][0] = 0
    reader.data.flush()
    del reader
    return dst


@pytest.fixture(scope="session")
def transformers_gguf(tmp_path_factory, stories_path):
    """stories260K as transformers loads it from GGUF: (a plain LlamaForCausalLM, its tokenizer)."""
    transformers = pytest.importorskip("transformers", reason="transformers builds the HF checkpoint")
    gguf_file = _patched_gguf(stories_path, tmp_path_factory.mktemp("gguf") / stories_path.name)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config  # "gguf": a GGUF-loaded model refuses to save, and we refuse to load it
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    return model, tokenizer


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, transformers_gguf) -> Path:
    """A one-file float32 safetensors checkpoint with tokenizer.json."""
    model, tokenizer = transformers_gguf
    path = tmp_path_factory.mktemp("hf") / "stories260K-hf"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def rewrite(src: Path, dst: Path, tensors: Callable[[dict], dict] | None = None,
            config: Callable[[dict], None] | None = None) -> Path:
    """A copy of checkpoint `src`, its tensors and config.json changed by the given functions."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    if tensors is not None:
        save_file(tensors(load_file(src / "model.safetensors")), dst / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        data = json.loads((dst / "config.json").read_text())
        config(data)
        (dst / "config.json").write_text(json.dumps(data))
    return dst


def _drop(name: str) -> Callable[[dict], dict]:
    return lambda t: {k: v for k, v in t.items() if k != name}


def _replace(name: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], dict]:
    return lambda t: {k: value(v) if k == name else v for k, v in t.items()}


def _truncate(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def test_logits_equal_gguf_and_layers_report_progress(hf_dir, stories_model):
    calls = []
    model = load_hf_dir(hf_dir, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 5) for i in range(1, 6)]
    assert model.config == stories_model.config
    assert (model.name, model.file_type, model.parameter_count) == ("stories260K-hf", "F32", 292800)
    torch.testing.assert_close(engine_logits(model, PROMPT), engine_logits(stories_model, PROMPT),
                               rtol=1e-5, atol=1e-5)


def test_greedy_200_from_bos_matches_oracle(hf_dir, stories_greedy):
    ids, text = stories_greedy
    model = load_model(hf_dir)
    engine = LLMEngine(model, EngineConfig(kv_cache_bytes=4 << 20))
    engine.add_request(GenerationRequest("0", [1], 200, SamplingParams(temperature=0), ignore_eos=True))
    out = []
    while engine.has_unfinished():
        for o in engine.step():
            out += o.token_ids
    assert out == ids
    assert model.tokenizer.decode(out) == text


def test_tokenizer_equals_gguf_tokenizer(hf_dir, stories_model):
    ours, gguf = load_hf_dir(hf_dir).tokenizer, stories_model.tokenizer
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.add_bos, ours.add_eos, ours.add_space_prefix) == \
        (gguf.vocab_size, gguf.bos_id, gguf.eos_id, gguf.add_bos, gguf.add_eos, gguf.add_space_prefix)
    rng = random.Random(0)
    texts = TEXTS + ["".join(rng.choice(TEXTS) for _ in range(4)) for _ in range(40)]
    for text in texts:
        assert ours.encode(text, add_special_tokens=True) == gguf.encode(text, add_special_tokens=True), text
        assert ours.decode(ours.encode(text)) == gguf.decode(gguf.encode(text))
    assert [ours.token_bytes(i) for i in range(512)] == [gguf.token_bytes(i) for i in range(512)]
    assert any(258 >= t >= 3 for t in ours.encode("中文😀")), "byte fallback was meant to be exercised"


@pytest.mark.parametrize("dtype,name", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
def test_half_precision_checkpoints_load(hf_dir, tmp_path, stories_model, dtype, name):
    path = rewrite(hf_dir, tmp_path / "half", tensors=lambda t: {k: v.to(dtype) for k, v in t.items()})
    model = load_hf_dir(path)
    assert model.file_type == name
    # Served in float32, the 16-bit weights stay 16-bit: no full-precision copy.
    from lumen.engine.model.linear import QuantEmbedding
    assert isinstance(model.weights.embed, QuantEmbedding)
    parts = model.weights.layers[0].wqkv.parts
    assert [p.weight.raw.numel() for p in parts] == [2 * p.out_features * p.in_features for p in parts]
    ours, ref = engine_logits(model, PROMPT), engine_logits(stories_model, PROMPT)
    assert float((ours - ref).abs().max() / ref.abs().max()) < 0.05
    # The same rounded weights computed in the checkpoint's own dtype.
    assert torch.isfinite(engine_logits(load_hf_dir(path, dtype=dtype), PROMPT)).all()


def test_sharded_checkpoint_with_index(transformers_gguf, tmp_path, stories_model):
    model, tokenizer = transformers_gguf
    path = tmp_path / "sharded"
    model.save_pretrained(path, safe_serialization=True, max_shard_size="300KB")
    tokenizer.save_pretrained(path)
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) > 2 and (path / "model.safetensors.index.json").exists()
    (path / "stray.safetensors").write_bytes(b"not listed in the index, so never opened")
    loaded = load_model(path, name="sharded")
    torch.testing.assert_close(engine_logits(loaded, PROMPT), engine_logits(stories_model, PROMPT),
                               rtol=1e-5, atol=1e-5)
    (path / shards[1]).unlink()
    with pytest.raises(ModelLoadError, match=rf"{shards[1]}: shard listed in model\.safetensors\.index\.json"):
        load_hf_dir(path)


@pytest.mark.parametrize("tie", [True, False])
def test_missing_lm_head_ties_output_to_embedding(hf_dir, tmp_path, caplog, tie):
    path = rewrite(hf_dir, tmp_path / "tied", tensors=_drop("lm_head.weight"),
                   config=lambda c: c.update(tie_word_embeddings=tie))
    weights = load_hf_dir(path).weights
    # the output matmul reads the embedding's own memory (F32 rows in the C kernels: a view)
    assert weights.output.weight.raw.data_ptr() == weights.embed.weight.data_ptr()
    assert ("no lm_head.weight although tie_word_embeddings is false" in caplog.text) is not tie


BAD = {
    "missing config.json": (lambda p: (p / "config.json").unlink(), r"config\.json: missing"),
    "missing tokenizer.json": (lambda p: (p / "tokenizer.json").unlink(), r"tokenizer\.json: missing"),
    "bad JSON": (lambda p: (p / "config.json").write_text('{"model_type": "llama",'),
                 r"config\.json: not readable JSON"),
    "no weights": (lambda p: (p / "model.safetensors").unlink(), r"no \*\.safetensors files"),
    "missing tensor": (dict(tensors=_drop("model.layers.2.mlp.up_proj.weight")),
                       r"stories260K-hf: tensor 'model\.layers\.2\.mlp\.up_proj\.weight' is missing"),
    "wrong shape": (dict(tensors=_replace("model.layers.1.self_attn.k_proj.weight", lambda v: v[:16])),
                    r"model\.safetensors: tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' has shape "
                    r"\[16, 64\], expected \[32, 64\]"),
    "int8 tensor": (dict(tensors=_replace("model.layers.0.mlp.down_proj.weight", lambda v: v.to(torch.int8))),
                    r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has dtype I8"),
    "truncated": (_truncate, r"model\.safetensors: not a readable safetensors file .*truncated"),
    "not llama": (dict(config=lambda c: c.update(model_type="mistral")), r"config\.json: model_type 'mistral'"),
    "rope scaling": (dict(config=lambda c: c.update(rope_parameters={"rope_type": "llama3", "factor": 8.0})),
                     r"config\.json: rope_parameters type 'llama3' is not supported"),
    "quantized": (dict(config=lambda c: c.update(quantization_config={"quant_method": "gptq"})),
                  r"config\.json: quantization_config \(quant_method 'gptq'\)"),
    "bad head count": (dict(config=lambda c: c.update(num_key_value_heads=3)),
                       r"config\.json: head count 8 is not a multiple of KV head count 3"),
    "tokenizer too big": (dict(config=lambda c: c.update(vocab_size=500)),
                          r"tokenizer\.json: the tokenizer has 512 tokens, more than the model's vocab_size 500"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoint_names_file_and_problem(hf_dir, tmp_path, case):
    change, message = BAD[case]
    path = tmp_path / "stories260K-hf"
    if callable(change):
        change(rewrite(hf_dir, path))
    else:
        rewrite(hf_dir, path, **change)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_random_corruption_loads_or_fails_cleanly(hf_dir, tmp_path):
    """Bytes flipped in the JSON files or the safetensors header: a ModelLoadError, never a crash."""
    rng = random.Random(1)
    files = ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"]
    for trial in range(40):
        path = rewrite(hf_dir, tmp_path / str(trial))
        target = path / files[trial % len(files)]
        data = bytearray(target.read_bytes())
        end = 2000 if target.suffix == ".safetensors" else len(data)  # the header, not the weights
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(min(end, len(data)))] = rng.randrange(32, 127)  # printable: past the JSON parser
        target.write_bytes(bytes(data))
        try:
            load_hf_dir(path)
        except ModelLoadError as exc:
            assert str(path) in str(exc)


def test_missing_path_and_file_dispatch(tmp_path, stories_path):
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        load_model(tmp_path / "nope")
    assert load_model(stories_path).file_type == "F32"


async def test_serve_loading_path_accepts_directory(hf_dir, stories_greedy):
    """`lumen serve --model NAME=DIR`: service.loading loads it, and the server generates the oracle."""
    from lumen.service.loading import load_models
    from lumen.v1 import inference_pb2 as pb
    from tests.service.conftest import start_harness
    (model,) = load_models([("stories-hf", hf_dir)], torch.float32)
    assert model.name == "stories-hf"
    harness = await start_harness(model)
    try:
        listed = (await harness.stub.ListModels(pb.ListModelsRequest())).models
        assert [(m.name, m.file_type) for m in listed] == [("stories-hf", "F32")]
        req = pb.GenerateRequest()
        req.sampling.temperature = 0
        req.stopping.max_new_tokens = 30
        req.stopping.ignore_eos = True
        msgs = [m async for m in harness.stub.Generate(req)]
        assert [t for m in msgs for t in m.token_ids] == stories_greedy[0][:30]
    finally:
        await harness.close()
