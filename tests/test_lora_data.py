"""The LoRA test data (tests/lora_data.py) is what the engine's tests take it for: the checkpoint is
the shared SmolLM2, the adapters have their configs, sizes and merges, trained16 gives its made-up
answer, and the GGUF files hold what llama.cpp's converter writes, in the layout noted here.

GGUF layout, as the converter (llama-cpp-python 0.3.36) writes it and GGUFReader reports it:
- `blk.N.attn_q.weight.lora_a`: ne [in, r], data [r, in]: PEFT's lora_A [r, in] unchanged;
- `blk.N.attn_q.weight.lora_b`: ne [r, out], data [out, r]: PEFT's lora_B [out, r], its rows
  permuted for Q and K (as the base's Q/K rows are: RoPE on adjacent pairs), others unchanged;
- `adapter.lora.alpha`: lora_alpha as PEFT stores it, even with use_rslora (llama.cpp's scale is
  alpha / r, so an rsLoRA adapter's scale alpha / sqrt(r) is lost in the conversion).
A cold cache builds everything in the first test that needs it (about a minute on 2 cores).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, dequantize
from safetensors import safe_open

from tests import lora_data
from tests.conftest import shared_file

pytestmark = pytest.mark.timeout(900)   # a cold cache, plus the sdist download

N_LAYERS, N_HEAD, N_KV_HEAD = 30, 9, 3
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
          "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}   # [out, in]


def peft_key(layer: int, target: str, ab: str) -> str:
    block = "self_attn" if target in lora_data.ATTENTION else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{target}.lora_{ab}.weight"


def peft_tensors(kind: str) -> dict[str, torch.Tensor]:
    with safe_open(lora_data.adapter_dir(kind) / "adapter_model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}   # noqa: SIM118 (safe_open is not iterable)


def rope_rows(b: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's Q/K row order (each head's rotary halves apart) to GGUF's (the pairs side by side)."""
    rows = b.shape[0]
    return b.reshape(n_head, 2, rows // n_head // 2, -1).transpose(1, 2).reshape(b.shape)


def gguf_fields(reader: GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def gguf_array(tensor) -> torch.Tensor:
    """A GGUF tensor as float32, in its data shape; a copy (the file is mapped read-only)."""
    return torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))


# --- the checkpoint and the PEFT adapters -------------------------------------------------------

def test_the_checkpoint_is_the_shared_model():
    ids = lora_data.capital_prompt_ids()
    path = shared_file("models", "SmolLM2-135M-Instruct.capital.prompt.ids")
    assert ids == [int(t) for t in path.read_text().split()]
    ref = np.load(shared_file("models", "SmolLM2-135M-Instruct.capital.ref64.logits.npy"))
    logits = lora_data.base_reference_logits(ids)
    assert logits.dtype == torch.float64 and logits.shape == (len(ids), 49152)
    assert (logits - torch.from_numpy(ref)).abs().max() < 1e-4   # 8e-6: rms eps stored as float32


@pytest.mark.parametrize("kind", list(lora_data.ADAPTERS))
def test_adapter_config_and_tensors(kind):
    spec = lora_data.ADAPTERS[kind]
    config = json.loads((lora_data.adapter_dir(kind) / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == (
        "LORA", spec.rank, spec.alpha, spec.use_rslora)
    assert sorted(config["target_modules"]) == sorted(spec.targets)
    assert config["base_model_name_or_path"] == lora_data.SMOLLM2_HUB_ID
    tensors = peft_tensors(kind)
    assert len(tensors) == N_LAYERS * len(spec.targets) * 2
    for layer in (0, N_LAYERS - 1):
        for target in spec.targets:
            out, inp = SHAPES[target]
            a, b = tensors[peft_key(layer, target, "A")], tensors[peft_key(layer, target, "B")]
            assert a.dtype == b.dtype == torch.float32
            assert a.shape == (spec.rank, inp) and b.shape == (out, spec.rank)
            assert b.abs().max() > 0   # trained or random: never PEFT's zero B


def test_random_updates_have_their_size():
    spec, tensors = lora_data.ADAPTERS["random8"], peft_tensors("random8")
    with safe_open(lora_data.smollm2_hf_dir() / "model.safetensors", "pt") as f:
        for layer, target in [(0, "q_proj"), (17, "down_proj")]:
            block = "self_attn" if target in lora_data.ATTENTION else "mlp"
            w = f.get_tensor(f"model.layers.{layer}.{block}.{target}.weight").double()
            b, a = tensors[peft_key(layer, target, "B")].double(), tensors[peft_key(layer, target, "A")].double()
            update = spec.scale * (b @ a)
            assert update.norm() / w.norm() == pytest.approx(lora_data.RANDOM_UPDATE_SIZE, rel=1e-4)


@pytest.mark.parametrize("kind", ["random8", "rslora16"])
def test_the_reference_merges_w_plus_scale_b_a(kind):
    """merge_and_unload in float64 is W + scale·B·A, scale alpha/sqrt(r) for rsLoRA (2.0 for
    rslora16, where alpha/r would be 0.5); and the update moves the logits by O(1)."""
    spec, tensors = lora_data.ADAPTERS[kind], peft_tensors(kind)
    assert spec.scale == (2.0 if spec.use_rslora else spec.alpha / spec.rank)
    merged = lora_data.reference_model(kind).model.layers[5].self_attn.k_proj.weight
    with safe_open(lora_data.smollm2_hf_dir() / "model.safetensors", "pt") as f:
        w = f.get_tensor("model.layers.5.self_attn.k_proj.weight").double()
    b, a = tensors[peft_key(5, "k_proj", "B")].double(), tensors[peft_key(5, "k_proj", "A")].double()
    assert merged.dtype == torch.float64
    torch.testing.assert_close(merged, w + spec.scale * (b @ a), rtol=0, atol=1e-12)

    ids = lora_data.capital_prompt_ids()
    moved = (lora_data.merged_reference_logits(kind, ids) - lora_data.base_reference_logits(ids)).abs()
    assert 0.1 < moved.mean() < 3 and moved.max() < 20


def test_trained_adapter_gives_its_answer_and_the_base_does_not():
    """Greedy decoding gives the answer exactly when, fed the answer, each position's argmax is the
    answer's next token: one forward per model instead of one per token."""
    prompt, n = lora_data.capital_prompt_ids(), lora_data.ANSWER_CHECK_TOKENS
    answer = lora_data.trained_answer_ids()[:n]
    ids = prompt + answer[:-1]
    trained = lora_data.merged_reference_logits("trained16", ids)[len(prompt) - 1:].argmax(-1).tolist()
    assert trained == answer
    base = lora_data.base_reference_logits(ids)[len(prompt) - 1:].argmax(-1).tolist()
    first_difference = next(i for i, (b, a) in enumerate(zip(base, answer, strict=True)) if b != a)
    assert lora_data.smollm2_tokenizer().decode(base[first_difference]) == " Paris"


# --- the GGUF adapters --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(lora_data.ADAPTERS))
def test_gguf_metadata(kind):
    spec = lora_data.ADAPTERS[kind]
    fields = gguf_fields(GGUFReader(lora_data.gguf_adapter(kind)))
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    # Raw lora_alpha, rsLoRA or not: the converter ignores use_rslora.
    assert fields["adapter.lora.alpha"] == float(spec.alpha)
    assert sorted(k for k in fields if k.startswith("adapter.")) == ["adapter.lora.alpha", "adapter.type"]


@pytest.mark.parametrize("kind", ["random8", "rslora16", "mlp4"])
def test_gguf_tensors_are_peft_a_and_b_with_q_k_rows_permuted(kind):
    spec, tensors = lora_data.ADAPTERS[kind], peft_tensors(kind)
    by_name = {t.name: t for t in GGUFReader(lora_data.gguf_adapter(kind, "f32")).tensors}
    assert set(by_name) == {f"blk.{layer}.{GGUF_NAMES[t]}.weight.lora_{ab}"
                            for layer in range(N_LAYERS) for t in spec.targets for ab in "ab"}
    for layer in (0, 13, N_LAYERS - 1):
        for target in spec.targets:
            out, inp = SHAPES[target]
            lora_a = by_name[f"blk.{layer}.{GGUF_NAMES[target]}.weight.lora_a"]
            lora_b = by_name[f"blk.{layer}.{GGUF_NAMES[target]}.weight.lora_b"]
            assert lora_a.tensor_type == lora_b.tensor_type == GGMLQuantizationType.F32
            assert list(lora_a.shape) == [inp, spec.rank] and lora_a.data.shape == (spec.rank, inp)
            assert list(lora_b.shape) == [spec.rank, out] and lora_b.data.shape == (out, spec.rank)
            a, b = tensors[peft_key(layer, target, "A")], tensors[peft_key(layer, target, "B")]
            n_head = {"q_proj": N_HEAD, "k_proj": N_KV_HEAD}.get(target)
            assert torch.equal(gguf_array(lora_a), a)
            assert torch.equal(gguf_array(lora_b), b if n_head is None else rope_rows(b, n_head))
            if n_head is not None:
                assert not torch.equal(gguf_array(lora_b), b)


@pytest.mark.parametrize("outtype, a_type, b_type, tolerance", [
    ("f16", GGMLQuantizationType.F16, GGMLQuantizationType.F16, 1e-3),
    ("bf16", GGMLQuantizationType.BF16, GGMLQuantizationType.BF16, 8e-3),
    # Q8_0 blocks run along a row of 32: lora_b's rows (r = 8) are too short, so they stay F16.
    ("q8_0", GGMLQuantizationType.Q8_0, GGMLQuantizationType.F16, 1e-2),
])
def test_gguf_outtypes(outtype, a_type, b_type, tolerance):
    exact = {t.name: gguf_array(t) for t in GGUFReader(lora_data.gguf_adapter("random8", "f32")).tensors}
    tensors = GGUFReader(lora_data.gguf_adapter("random8", outtype)).tensors
    assert len(tensors) == len(exact)
    for t in tensors:
        assert t.tensor_type == (a_type if t.name.endswith("lora_a") else b_type)
        got, want = gguf_array(t), exact[t.name]
        assert got.shape == want.shape
        assert (got - want).abs().max() <= tolerance * want.abs().max()
