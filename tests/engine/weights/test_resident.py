"""The resident huge-page arena that quantized weights are read into."""
from __future__ import annotations

import os

import pytest

from lumen.engine.weights.resident import CHUNK, ResidentArena, TruncatedRead


def test_reads_are_the_file_bytes_aligned_and_independent(tmp_path):
    data = os.urandom(3 * 1000 + 7)
    path = tmp_path / "blob"
    path.write_bytes(data)
    arena = ResidentArena()
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = [arena.read(fd, 0, 1000), arena.read(fd, 1000, 1), arena.read(fd, 1001, 2006)]
    finally:
        os.close(fd)
    assert [bytes(p.numpy()) for p in parts] == [data[:1000], data[1000:1001], data[1001:]]
    assert all(p.data_ptr() % 64 == 0 for p in parts)
    parts[1][0] = parts[1][0] ^ 0xFF        # writable, and only its own bytes
    assert bytes(parts[0].numpy()) == data[:1000] and bytes(parts[2].numpy()) == data[1001:]
    assert arena.nbytes == len(data)


def test_a_tensor_larger_than_a_chunk_gets_its_own(tmp_path):
    path = tmp_path / "big"
    with open(path, "wb") as f:
        f.truncate(CHUNK + 4096)
    arena = ResidentArena()
    fd = os.open(path, os.O_RDONLY)
    try:
        small, big = arena.read(fd, 0, 10), arena.read(fd, 0, CHUNK + 4096)
    finally:
        os.close(fd)
    assert big.numel() == CHUNK + 4096 and int(big[-1]) == 0 and small.numel() == 10


def test_a_short_file_is_reported(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(TruncatedRead, match="short"):
            ResidentArena().read(fd, 50, 100)
    finally:
        os.close(fd)


def test_loaded_quantized_weights_hold_the_file_bytes():
    from gguf import GGUFReader

    from lumen.engine.weights.gguf_loader import load_gguf
    from tests.conftest import shared_file
    path = shared_file("quant", "stories260K-Q4_0.gguf")
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    layer = load_gguf(path).weights.layers[0]
    for part, name in zip(layer.wqkv.parts, ("attn_q", "attn_k", "attn_v")):
        expected = bytes(tensors[f"blk.0.{name}.weight"].data.reshape(-1).view("uint8"))
        assert bytes(part.weight.raw.reshape(-1).numpy()) == expected


def test_a_read_that_fails_while_loading_names_the_tensor(monkeypatch):
    """A file cut short after its header was read (or any read error) fails the load cleanly."""
    from lumen.engine.errors import ModelLoadError
    from lumen.engine.weights.gguf_loader import load_gguf
    from tests.conftest import shared_file

    def short(self, fd, offset, nbytes):
        raise TruncatedRead(f"file ends {nbytes} bytes short of a tensor at offset {offset}")
    monkeypatch.setattr(ResidentArena, "read", short)
    with pytest.raises(ModelLoadError, match=r"tensor 'blk\.0\.\w+\.weight' could not be read .*short.*truncated"):
        load_gguf(shared_file("quant", "stories260K-Q4_0.gguf"))
