"""Both attention backends against the slow reference, over mixed batches on a shuffled paged cache.

Every run draws fresh inputs; a failure prints the seed that rebuilds them (SEED=... to replay).
Without CUDA the Triton kernels run under TRITON_INTERPRET=1 on CPU tensors, set here before
the kernel module is imported; shapes are kept small because the interpreter is slow.
"""
from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass

import pytest
import torch

from lumen.engine.model.attention.metadata import AttentionMetadata
from lumen.engine.model.attention.reference import reference_attention
from lumen.engine.model.attention.select import ENV_VAR, select_backend
from lumen.engine.model.attention.torch_backend import TorchAttention
from lumen.engine.native import kernels as native

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _import_kernels():
    """(module, None) or (None, why the Triton tests cannot run)."""
    if DEVICE.type == "cpu":
        # Read when the kernels are decorated and again by triton's own lazy imports, so it stays
        # set for the rest of the session (nothing else runs triton on CPU).
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        from lumen.engine.triton_kernels import paged_attention
    except ImportError as exc:
        return None, f"triton is not importable ({exc}); the Triton backend is untested"
    if DEVICE.type == "cpu" and not paged_attention.INTERPRETED:
        return None, ("lumen.engine.triton_kernels.paged_attention was imported before TRITON_INTERPRET=1; "
                      "rerun with it set")
    return paged_attention, None


KERNELS, NO_TRITON = _import_kernels()
needs_triton = pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")

# (query heads, KV heads, head_dim, block_size): GQA ratios 1, 4 and 8, head sizes 64 and 128.
CONFIGS = [(2, 2, 64, 16), (4, 1, 128, 32), (8, 1, 64, 32), (8, 2, 128, 16)]
CONFIG_IDS = ["gqa1-hd64-bs16", "gqa4-hd128-bs32", "gqa8-hd64-bs32", "gqa4x2-hd128-bs16"]
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (4e-2, 2e-2)}


@dataclass
class Case:
    q: torch.Tensor          # [num_tokens, nh, hd]
    k_cache: torch.Tensor    # [num_blocks, block_size, nkv, hd]
    v_cache: torch.Tensor
    meta: AttentionMetadata
    scale: float
    seed: int


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("SEED", "0")) or random.SystemRandom().randrange(1, 2**31)


def mixed_lengths(r: random.Random, block_size: int) -> tuple[list[int], list[int]]:
    """Decodes, a fresh prefill and chunked prefills after cached context, in a random order."""
    fresh, chunk = r.randint(2, 20), r.randint(2, 12)
    shapes = [  # (query_len, seq_len)
        (1, 2 * block_size),                                    # decode ending on a block boundary
        (1, block_size + r.randrange(1, block_size)),           # decode into a partial block
        (fresh, fresh),                                         # prefill from scratch
        (r.randint(2, 12), 3 * block_size),                     # chunk ending on a block boundary
        (chunk, chunk + r.randint(1, 2 * block_size)),          # chunk after any context
    ]
    r.shuffle(shapes)
    return [q for q, _ in shapes], [s for _, s in shapes]


def decode_lengths(r: random.Random, block_size: int) -> tuple[list[int], list[int]]:
    seq_lens = [1, block_size, 2 * block_size + r.randrange(1, block_size), r.randint(2, 3 * block_size)]
    r.shuffle(seq_lens)
    return [1] * len(seq_lens), seq_lens


def tile_edge_lengths(r: random.Random, block_size: int) -> tuple[list[int], list[int]]:
    """Chunks whose cached context ends on, just before and just after a 16-token tile edge."""
    contexts = [14, 15, 16, 17, 31, 32, 33, 0]
    query_lens = [r.randint(1, 20) for _ in contexts]
    return query_lens, [q + c for q, c in zip(query_lens, contexts)]


def make_case(seed: int, lengths, config: tuple[int, int, int, int], dtype: torch.dtype) -> Case:
    """Random q and caches; each sequence's blocks are scattered over a shuffled pool, and every
    cache row no sequence owns is NaN, so reading one poisons the output."""
    num_heads, num_kv_heads, head_dim, block_size = config
    query_lens, seq_lens = lengths(random.Random(seed), block_size)
    gen = torch.Generator().manual_seed(seed)
    owned = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(owned) + 3                                 # spare blocks nobody owns
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [pool[sum(owned[:i]): sum(owned[: i + 1])] for i in range(len(owned))]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    written = torch.zeros(shape[:2], dtype=torch.bool)          # [num_blocks, block_size]
    for table, seq_len in zip(tables, seq_lens):
        for p in range(seq_len):
            written[table[p // block_size], p % block_size] = True
    caches = [torch.randn(shape, generator=gen).masked_fill(~written[:, :, None, None], float("nan"))
              for _ in range(2)]
    q = torch.randn((sum(query_lens), num_heads, head_dim), generator=gen)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size).to(DEVICE)
    k_cache, v_cache = (c.to(DEVICE, dtype) for c in caches)
    return Case(q.to(DEVICE, dtype), k_cache, v_cache, meta, head_dim ** -0.5, seed)


def assert_matches_reference(out: torch.Tensor, case: Case, what: str) -> None:
    ref = reference_attention(case.q.cpu(), case.k_cache.cpu(), case.v_cache.cpu(), _cpu(case.meta), case.scale)
    atol, rtol = TOLERANCES[case.q.dtype]
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = (out.cpu().float() - ref.float()).abs().max().item()
    assert torch.allclose(out.cpu().float(), ref.float(), atol=atol, rtol=rtol), (
        f"{what}: max abs error {err:.3g} (atol {atol}, rtol {rtol}); replay with SEED={case.seed} "
        f"query_lens={case.meta.query_lens_list} seq_lens={case.meta.seq_lens_list}")


def _cpu(meta: AttentionMetadata) -> AttentionMetadata:
    return meta.to(torch.device("cpu"))


@pytest.mark.parametrize("use_native", [True, False], ids=["c-kernel", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("lengths", [mixed_lengths, decode_lengths], ids=["mixed", "decode"])
def test_torch_backend(lengths, config, dtype, use_native, seed):
    if use_native and not native.available():
        pytest.skip("no C compiler: the C kernel cannot be built here")
    case = make_case(seed, lengths, config, dtype)
    q, kc, vc = case.q.cpu(), case.k_cache.cpu(), case.v_cache.cpu()
    out = TorchAttention(use_native=use_native).forward(q, kc, vc, _cpu(case.meta), case.scale)
    assert_matches_reference(out, case, f"TorchAttention(use_native={use_native})")


def _every_row(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, seqs, context lengths) for every query row of the batch, prefill rows included."""
    rows, seqs, ctx = [], [], []
    start = 0
    for s, (q_len, seq_len) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
        for i in range(q_len):
            rows.append(start + i)
            seqs.append(s)
            ctx.append(seq_len - q_len + i + 1)
        start += q_len
    return (torch.tensor(rows, dtype=torch.int64), torch.tensor(seqs, dtype=torch.int32),
            torch.tensor(ctx, dtype=torch.int32))


needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler: the C kernels cannot be built")


@needs_native
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", CONFIGS + [(4, 2, 8, 16), (4, 2, 80, 16)],
                         ids=CONFIG_IDS + ["hd8", "hd80"])
def test_c_kernel_every_row(config, cache_dtype, seed):
    """The C kernel on each row of mixed batches (any context length, head sizes with a tail)."""
    case = make_case(seed, mixed_lengths, config, cache_dtype)
    meta = _cpu(case.meta)
    q = case.q.float()
    out = torch.full_like(q, float("nan"))
    native.paged_attention_rows(q, case.k_cache, case.v_cache, meta.block_tables, *_every_row(meta),
                                case.scale, out)
    ref = reference_attention(q, case.k_cache.float(), case.v_cache.float(), meta, case.scale)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), \
        f"max abs error {(out - ref).abs().max().item():.3g}; replay with SEED={seed}"


@needs_native
def test_c_kernel_row_is_batch_invariant(seed):
    """A row's output has the same bits alone, in the whole batch, and on 1 or 2 threads."""
    case = make_case(seed, mixed_lengths, (8, 1, 64, 32), torch.float32)
    meta = _cpu(case.meta)
    rows, seqs, ctx = _every_row(meta)
    batched = torch.zeros_like(case.q)
    native.paged_attention_rows(case.q, case.k_cache, case.v_cache, meta.block_tables, rows, seqs, ctx,
                                case.scale, batched)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for i in torch.randperm(len(rows))[:6].tolist():
            alone = torch.zeros_like(case.q)
            native.paged_attention_rows(case.q, case.k_cache, case.v_cache, meta.block_tables, rows[i:i + 1],
                                        seqs[i:i + 1], ctx[i:i + 1], case.scale, alone)
            assert torch.equal(alone[rows[i]], batched[rows[i]]), f"row {i} differs alone; SEED={seed}"
    finally:
        torch.set_num_threads(threads)


@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_triton_backend_mixed_batch(config, dtype, seed):
    from lumen.engine.model.attention.triton_backend import TritonAttention
    case = make_case(seed, mixed_lengths, config, dtype)
    out = TritonAttention().forward(case.q, case.k_cache, case.v_cache, case.meta, case.scale)
    assert_matches_reference(out, case, "TritonAttention (prefill kernel)")


@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_triton_backend_decode_batch(config, dtype, seed):
    from lumen.engine.model.attention.triton_backend import TritonAttention
    case = make_case(seed, decode_lengths, config, dtype)
    out = TritonAttention().forward(case.q, case.k_cache, case.v_cache, case.meta, case.scale)
    assert_matches_reference(out, case, "TritonAttention (decode kernel)")


@needs_triton
@pytest.mark.parametrize("num_splits", [3, 8])
@pytest.mark.parametrize("config", CONFIGS[1:], ids=CONFIG_IDS[1:])
def test_decode_forced_splits(config, num_splits, seed):
    """Several splits per sequence, some of them empty for the short ones, merged by the reduction."""
    case = make_case(seed, decode_lengths, config, torch.float16)
    out = KERNELS.paged_decode_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale,
                                         num_splits=num_splits)
    assert_matches_reference(out, case, f"paged_decode_attention(num_splits={num_splits})")


@needs_triton
@pytest.mark.parametrize("lengths", [tile_edge_lengths, decode_lengths], ids=["tile-edges", "decode"])
def test_small_tiles(lengths, seed, monkeypatch):
    """Tiles smaller than the context: several query blocks, unmasked full tiles and a masked tail."""
    monkeypatch.setattr(KERNELS, "_prefill_config", lambda group_pad, *_: (max(1, 16 // group_pad), 16, 4, 2))
    monkeypatch.setattr(KERNELS, "_decode_config", lambda *_: (16, 4, 2))
    case = make_case(seed, lengths, (8, 2, 64, 16), torch.float32)
    out = KERNELS.paged_prefill_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale)
    assert_matches_reference(out, case, "paged_prefill_attention with 16-token tiles")
    if lengths is decode_lengths:
        out = KERNELS.paged_decode_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale,
                                             num_splits=2)
        assert_matches_reference(out, case, "paged_decode_attention with 16-token tiles")


@needs_triton
@pytest.mark.parametrize("head_dim", [8, 80])
@pytest.mark.parametrize("lengths", [mixed_lengths, decode_lengths], ids=["mixed", "decode"])
def test_padded_head_dims(lengths, head_dim, seed):
    """Head sizes that are below 16 or not a power of two run on a zero-padded head dimension."""
    from lumen.engine.model.attention.triton_backend import TritonAttention
    case = make_case(seed, lengths, (4, 2, head_dim, 16), torch.float32)
    out = TritonAttention().forward(case.q, case.k_cache, case.v_cache, case.meta, case.scale)
    assert_matches_reference(out, case, f"TritonAttention, head_dim {head_dim}")


@needs_triton
def test_launchers_reject_bad_inputs(seed):
    case = make_case(seed, mixed_lengths, CONFIGS[0], torch.float32)
    with pytest.raises(AssertionError, match="one query token"):
        KERNELS.paged_decode_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale)
    with pytest.raises(AssertionError, match="share one dtype"):
        KERNELS.paged_prefill_attention(case.q.half(), case.k_cache, case.v_cache, case.meta, case.scale)
    with pytest.raises(AssertionError, match="must be int32"):
        bad = dataclasses.replace(case.meta, seq_lens=case.meta.seq_lens.long())
        KERNELS.paged_prefill_attention(case.q, case.k_cache, case.v_cache, bad, case.scale)


@needs_triton
def test_num_splits_heuristic():
    choose = KERNELS.choose_num_splits
    assert choose(max_seq_len=100, num_seqs=1, num_kv_heads=1) == 1        # too short to split
    assert choose(max_seq_len=4096, num_seqs=64, num_kv_heads=4, num_sms=132) == 2
    assert choose(max_seq_len=32768, num_seqs=1, num_kv_heads=8, num_sms=132) == 33
    assert choose(max_seq_len=4096, num_seqs=512, num_kv_heads=8) == 1     # the batch fills the GPU


def test_select_backend(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert isinstance(select_backend(torch.device("cpu")), TorchAttention)
    monkeypatch.setenv(ENV_VAR, "torch")
    assert isinstance(select_backend(DEVICE), TorchAttention)
    monkeypatch.setenv(ENV_VAR, "flash")
    with pytest.raises(ValueError, match="not a backend"):
        select_backend(DEVICE)
    if NO_TRITON is None:
        monkeypatch.setenv(ENV_VAR, "triton")
        assert select_backend(DEVICE).name == "triton"
        if DEVICE.type == "cuda":
            monkeypatch.delenv(ENV_VAR)
            assert select_backend(DEVICE).name == "triton"
