"""Loading GGUF files: quantized files against the exact reference, and clear errors for bad files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader

from lumen.engine.demo.synthetic import SyntheticShape, write_synthetic_llama
from lumen.engine.errors import ModelLoadError
from lumen.engine.weights.gguf_loader import load_gguf
from tests.conftest import shared_file
from tests.engine.model.test_llama_reference import PROMPT as QUANT_PROMPT  # the prompt of shared/data/quant
from tests.engine.model.test_llama_reference import assert_as_close_as_llama_cpp, engine_logits

TINY = SyntheticShape(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, context_length=128)


@pytest.fixture(scope="module")
def vocab():
    from lumen.engine.demo.demo_model import demo_vocab
    return demo_vocab()


def write_tiny(path, vocab, qtype=GGMLQuantizationType.Q8_0):
    return write_synthetic_llama(path, TINY, vocab, qtype=qtype, seed=7, name="tiny")


# llama.cpp's own error against the exact reference, from shared/data/quant/README.md.
LLAMA_CPP_ERROR = {
    "stories260K-Q4_0.gguf": 1.3e-2, "stories260K-Q8_0.gguf": 7.7e-3, "synth256-BF16.gguf": 5.6e-3,
    "synth256-F16.gguf": 1.1e-3, "synth256-IQ1_S-imat.gguf": 3.9e-2, "synth256-IQ2_XXS-imat.gguf": 2.9e-2,
    "synth256-IQ3_S.gguf": 3.4e-2, "synth256-IQ4_NL.gguf": 2.4e-2, "synth256-IQ4_XS.gguf": 3.0e-2,
    "synth256-Q2_K.gguf": 3.5e-2, "synth256-Q3_K_M.gguf": 2.9e-2, "synth256-Q4_0.gguf": 1.9e-2,
    "synth256-Q4_1.gguf": 1.9e-2, "synth256-Q4_K_M.gguf": 3.1e-2, "synth256-Q5_0.gguf": 2.0e-2,
    "synth256-Q5_1.gguf": 1.9e-2, "synth256-Q5_K_M.gguf": 3.2e-2, "synth256-Q6_K.gguf": 3.3e-2,
    "synth256-Q8_0.gguf": 2.1e-2, "synth256-f32.gguf": 6.0e-4,
}


@pytest.mark.parametrize("mode", ["exact", "int8", "auto"])
@pytest.mark.parametrize("name", sorted(LLAMA_CPP_ERROR))
def test_quantized_logits_match_exact_reference(name, mode):
    """Acceptance: in every matmul mode at least as close to the float64 reference as llama.cpp,
    argmax equal where it is clear.

    The weights stay in their blocks and are decoded exactly inside the matmul: in float32 in the
    exact mode, times 8-bit activations in the int8 mode, per weight type in the auto mode."""
    path = shared_file("quant", name)
    ref = torch.from_numpy(np.load(shared_file("quant", name + ".ref64.logits.npy")))
    model = load_gguf(path)
    model.weights.set_matmul_mode(mode)
    assert_as_close_as_llama_cpp(engine_logits(model, QUANT_PROMPT), ref, LLAMA_CPP_ERROR[name], mode)


@pytest.mark.parametrize("model", ["stories260K", "tiny"])
def test_int8_mode_interleaves_q4_0_weights_in_place_with_the_same_logits(model, tmp_path, vocab):
    """The int8 mode rearranges the layers' Q4_0 weights in place at their first matmul
    (kernels.X8: 8 outputs a vector register, no second copy). The logits are those of the
    row by row kernels bit for bit, for a prompt, one row (decode) and three; the exact mode puts
    the file's layout back, and a model built before that rebuilds its layers' C structs (tiny's
    layers each run as one C call; stories260K's, whose ffn_down has no C kernel, do not)."""
    from lumen.engine.model.linear import NativeQuantLinear
    from lumen.engine.native import kernels as native
    from tests.engine.model.test_llama_reference import paged_model, step
    if not native.available():
        pytest.skip("no C kernels here: the int8 mode is theirs")
    path = (shared_file("quant", "stories260K-Q4_0.gguf") if model == "stories260K"
            else write_tiny(tmp_path / "m.gguf", vocab, GGMLQuantizationType.Q4_0))
    loaded = load_gguf(path)
    assert (paged_model(loaded).layer_structs is not None) == (model == "tiny")
    weights = loaded.weights
    parts = [p for layer in weights.layers for linear in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)
             for p in getattr(linear, "parts", [linear]) if isinstance(p, NativeQuantLinear)]
    qtypes = lambda: {p.weight.qtype for p in parts}  # noqa: E731
    assert parts and qtypes() == {native.Q4_0}
    n = len(QUANT_PROMPT)

    def run(model) -> torch.Tensor:
        table = [3, 1, 2, 0]
        return torch.cat([step(model, QUANT_PROMPT[:n - 4], 0, table), step(model, QUANT_PROMPT[n - 4:n - 3], n - 4, table),
                          step(model, QUANT_PROMPT[n - 3:], n - 3, table)])

    weights.set_matmul_mode("int8")
    for p in parts:
        p.interleave = False
    plain = run(paged_model(loaded))
    assert qtypes() == {native.Q4_0}
    weights.set_matmul_mode("int8")
    model = paged_model(loaded)
    got = run(model)
    assert qtypes() == {native.X8[native.Q4_0]}
    assert weights.output.weight.qtype not in native.X8_BASE   # it may be the embedding's (tied): never rearranged
    assert torch.equal(got, plain)
    weights.set_matmul_mode("exact")
    assert qtypes() == {native.Q4_0}
    exact = run(model)
    assert torch.equal(exact, run(paged_model(loaded))) and not torch.equal(exact, got)


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.F32, GGMLQuantizationType.F16,
                                   GGMLQuantizationType.BF16, GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0])
def test_supported_types_load(tmp_path, vocab, qtype):
    model = load_gguf(write_tiny(tmp_path / "m.gguf", vocab, qtype))
    assert model.config.dim == 64 and model.config.n_kv_heads == 2
    assert model.file_type == qtype.name
    assert torch.isfinite(engine_logits(model, [0, 5, 9])).all()


def test_unsupported_type_names_tensor_and_type(tmp_path, vocab, monkeypatch):
    # Every type gguf-py has a reference for is registered; drop one to see the refusal.
    from lumen.engine.weights import gguf_loader as loader
    monkeypatch.delitem(loader.QUANT_TYPES, GGMLQuantizationType.Q4_1)
    with pytest.raises(ModelLoadError, match=r"blk\.0\.attn_q\.weight.*Q4_1"):
        load_gguf(write_tiny(tmp_path / "m.gguf", vocab, GGMLQuantizationType.Q4_1))


def test_unknown_type_id_is_refused(tmp_path, vocab):
    path = write_tiny(tmp_path / "m.gguf", vocab, GGMLQuantizationType.Q4_1)
    reader = GGUFReader(path, "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    tensor.field.parts[4][0] = 99          # raw type id: no GGML type has it
    reader.data.flush()
    del reader, tensor
    with pytest.raises(ModelLoadError, match=r"m\.gguf.*99"):
        load_gguf(path)


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


def test_a_truncated_file_says_so_with_the_sizes(tmp_path, vocab):
    data = write_tiny(tmp_path / "m.gguf", vocab).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError, match=rf"cut\.gguf: the file is truncated: its tensors need {len(data):,} "
                                             rf"bytes, the file has {len(data) - 1000:,} \(1,000 missing\)"):
        load_gguf(tmp_path / "cut.gguf")


@pytest.mark.parametrize("length", [12_191_744, 2**64 - 1])
def test_a_damaged_array_length_fails_at_once_saying_so(tmp_path, vocab, length):
    """gguf-py reads empty scalars past the end and advances nothing, so it once looped 100 s over a
    token-type array whose length byte was flipped (seed 4092774752 of the test below)."""
    import struct
    # The check overrides this gguf-py internal: a gguf release without it fails here, not in a hang.
    assert "_get_field_parts" in vars(GGUFReader), "gguf-py's reader changed: re-check _CheckedReader"
    source = write_tiny(tmp_path / "m.gguf", vocab)
    field = GGUFReader(source).fields["tokenizer.ggml.token_type"]
    data = bytearray(source.read_bytes())
    at = int(field.offset) + 8 + len(field.name.encode()) + 4 + 4   # key length, key, value type, item type
    assert struct.unpack_from("<Q", data, at)[0] == len(vocab.tokens)
    struct.pack_into("<Q", data, at, length)
    (tmp_path / "long.gguf").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=rf"long\.gguf: .*a metadata array at byte {at - 4:,} claims {length:,} "
                                             r"elements, more than the [0-9,]+ bytes left"):
        load_gguf(tmp_path / "long.gguf")


@pytest.mark.parametrize("context", [(1 << 24) + 1, 318767232])
def test_an_impossible_context_length_is_refused_before_any_table_is_built(tmp_path, vocab, context):
    """A flipped top byte of context_length (128 -> 318767232) loads, and the model then builds RoPE
    tables for the whole context (20 GB here) when an engine starts: refused at load instead."""
    from dataclasses import replace
    path = write_synthetic_llama(tmp_path / "m.gguf", replace(TINY, context_length=context), vocab,
                                 qtype=GGMLQuantizationType.Q8_0, seed=7, name="tiny")
    with pytest.raises(ModelLoadError, match=f"context length.*{context}|{context}.*context length"):
        load_gguf(path)


# Runs in a child process whose address space is capped: a corrupted size that makes the loader
# allocate without bound fails there as an exception with its seed, instead of the whole test run
# being killed for memory (which happened once, seed unknown).
CORRUPTION_CHILD = r"""
import random, resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
from lumen.engine.errors import ModelLoadError
from lumen.engine.weights.gguf_loader import load_gguf
data, seed, out = Path(sys.argv[1]).read_bytes(), int(sys.argv[2]), Path(sys.argv[3])
rng = random.Random(seed)
for i in range(100):
    corrupt = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        corrupt[rng.randrange(min(len(corrupt), 60000))] = rng.randrange(256)
    path = out / f"corrupt{i}.gguf"
    path.write_bytes(bytes(corrupt))
    try:
        load_gguf(path)
    except ModelLoadError as exc:
        if path.name not in str(exc):
            sys.exit(f"seed {seed}, file {i}: the error does not name the file: {exc}")
    except Exception as exc:
        sys.exit(f"seed {seed}, file {i}: {type(exc).__name__}: {exc}")
    path.unlink()
"""


def test_randomly_corrupted_files_load_or_fail_cleanly(tmp_path, vocab):
    """Bytes flipped anywhere in the header, metadata or tensor infos: a clean ModelLoadError
    naming the file, or (damage inside tensor data or token text) a model that loads. Never
    any other exception, and never more than a few GiB of memory."""
    import random
    import subprocess
    import sys
    from pathlib import Path
    source = write_tiny(tmp_path / "m.gguf", vocab)
    seed = random.randrange(2**32)
    done = subprocess.run([sys.executable, "-c", CORRUPTION_CHILD, str(source), str(seed), str(tmp_path)],
                          cwd=Path(__file__).resolve().parents[3], capture_output=True, text=True, timeout=280,
                          check=False)
    assert done.returncode == 0, f"seed {seed}: {done.stderr[-3000:]}"
