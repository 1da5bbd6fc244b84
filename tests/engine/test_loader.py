"""Loading GGUF files: quantized files against the exact reference, and clear errors for bad files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader

from engine.errors import ModelLoadError
from engine.loader import load_gguf
from engine.synthetic import SyntheticShape, write_synthetic_llama
from tests.conftest import shared_file
from tests.engine.test_model_reference import PROMPT, engine_logits

TINY = SyntheticShape(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, context_length=128)


@pytest.fixture(scope="module")
def vocab():
    from engine.demo_model import demo_vocab
    return demo_vocab()


def write_tiny(path, vocab, qtype=GGMLQuantizationType.Q8_0):
    return write_synthetic_llama(path, TINY, vocab, qtype=qtype, seed=7, name="tiny")


@pytest.mark.parametrize("name,llama_cpp_error", [("stories260K-Q8_0.gguf", 7.7e-3), ("stories260K-Q4_0.gguf", 1.3e-2)])
def test_quantized_logits_match_exact_reference(name, llama_cpp_error):
    path = shared_file("quant", name)
    ref = torch.from_numpy(np.load(shared_file("quant", name + ".ref64.logits.npy")))
    ours = engine_logits(load_gguf(path), PROMPT).double()
    err = float((ours - ref).abs().max() / ref.abs().max())
    assert err < llama_cpp_error, f"relative error {err:.2e}"
    assert err < 1e-4  # dequantized exactly, computed in fp32
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.F32, GGMLQuantizationType.F16,
                                   GGMLQuantizationType.BF16, GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0])
def test_supported_types_load(tmp_path, vocab, qtype):
    model = load_gguf(write_tiny(tmp_path / "m.gguf", vocab, qtype))
    assert model.config.dim == 64 and model.config.n_kv_heads == 2
    assert model.file_type == qtype.name
    assert torch.isfinite(engine_logits(model, [0, 5, 9])).all()


def test_unsupported_type_names_tensor_and_type(tmp_path, vocab):
    with pytest.raises(ModelLoadError, match=r"blk\.0\.attn_q\.weight.*Q4_1"):
        load_gguf(write_tiny(tmp_path / "m.gguf", vocab, GGMLQuantizationType.Q4_1))


def test_shape_mismatch_names_tensor(tmp_path, vocab):
    path = write_tiny(tmp_path / "m.gguf", vocab)
    reader = GGUFReader(path, "r+")
    field = reader.fields["llama.feed_forward_length"]
    field.parts[field.data[0]][0] = 96  # the metadata now disagrees with the tensors
    reader.data.flush()
    del reader
    with pytest.raises(ModelLoadError, match=r"ffn_gate\.weight.*shape \[128, 64\], expected \[96, 64\]"):
        load_gguf(path)


def test_truncated_and_garbage_files_fail_cleanly(tmp_path, vocab):
    path = write_tiny(tmp_path / "m.gguf", vocab)
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    (tmp_path / "junk.gguf").write_bytes(np.random.default_rng().bytes(4096))
    for name in ("cut.gguf", "junk.gguf", "missing.gguf"):
        with pytest.raises(ModelLoadError, match=name):
            load_gguf(tmp_path / name)


def test_randomly_corrupted_files_load_or_fail_cleanly(tmp_path, vocab):
    """Bytes flipped anywhere in the header, metadata or tensor infos: a clean ModelLoadError
    naming the file, or (damage inside tensor data or token text) a model that loads. Never
    any other exception."""
    import random
    data = write_tiny(tmp_path / "m.gguf", vocab).read_bytes()
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for i in range(100):
        corrupt = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            corrupt[rng.randrange(min(len(corrupt), 60000))] = rng.randrange(256)
        path = tmp_path / f"corrupt{i}.gguf"
        path.write_bytes(bytes(corrupt))
        try:
            load_gguf(path)
        except ModelLoadError as exc:
            assert path.name in str(exc), f"seed {seed}: {exc}"
        except Exception as exc:  # noqa: BLE001 - the point of the test
            raise AssertionError(f"seed {seed}, file {i}: {type(exc).__name__}: {exc}") from exc
        path.unlink()
