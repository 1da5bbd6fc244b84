"""GPU benchmark of the paged-attention Triton kernels (written for an H200).

    .venv/bin/python bench/attention_gpu.py [--batch 64] [--context 4096] [--prefill-seqs 8] [--prefill-len 2048]

Decode: batch 64, context 4096, 32 query / 4 KV heads, head 128, fp16. Decode is memory bound,
so it reports the bandwidth achieved (K/V read + q read + out written) against a measured
device-to-device copy of a large buffer. Prefill: 8 fresh sequences of 2048 tokens, causal,
same heads, reported in TFLOP/s against torch SDPA on contiguous (unpaged) K/V.
Both kernels are first checked against the torch backend. Prints a Markdown table.
It needs a CUDA device and exits with a message when there is none; it never writes files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lumen.engine.model.attention.metadata import AttentionMetadata  # noqa: E402
from lumen.engine.model.attention.torch_backend import TorchAttention  # noqa: E402

BLOCK_SIZE = 16


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/attention_gpu.py needs a CUDA GPU (it times the Triton kernels); none is visible. "
                 "Run it on a GPU machine, or use the tests (TRITON_INTERPRET=1) for correctness on CPU.")
    import triton.testing  # after the check, so that a machine without a GPU gets the message above

    def bench(fn) -> float:
        """Median seconds of fn over ~200 ms of repeats; do_bench flushes L2 between them."""
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3

    props = torch.cuda.get_device_properties(0)
    if args.sweep:
        sweep(args, torch.device("cuda"), bench)
    rows = run(args, torch.device("cuda"), bench, props.multi_processor_count)
    print_table(props.name, args, rows)


def sweep(args: argparse.Namespace, device: torch.device, bench) -> None:
    """Time each tile configuration of both kernels (checked first); prints one line per config.

    The launchers read their tiles from `_decode_config` / `_prefill_config`; this replaces them
    for a moment, so the numbers are those of the shipped launch path."""
    from lumen.engine.triton_kernels import paged_attention as pa
    nh, nkv, hd, scale = args.heads, args.kv_heads, args.head_dim, args.head_dim ** -0.5
    q, kc, vc, meta = paged_inputs([1] * args.batch, [args.context] * args.batch, nh, nkv, hd, device)
    moved = 2 * args.batch * args.context * nkv * hd * kc.element_size() + 2 * q.nbytes
    shipped = pa._decode_config
    try:
        for block_n in (32, 64, 128):
            for warps in (2, 4, 8):
                for stages in (1, 2, 3, 4):
                    pa._decode_config = lambda *_: (block_n, warps, stages)
                    for splits in (2, 4, 8):
                        fn = lambda: pa.paged_decode_attention(q, kc, vc, meta, scale, num_splits=splits)
                        try:
                            check("decode sweep", fn(), q, kc, vc, meta)
                        except (Exception, SystemExit) as e:
                            print(f"sweep decode block_n={block_n} warps={warps} stages={stages} splits={splits}: "
                                  f"failed: {str(e).splitlines()[0][:120]}", flush=True)
                            continue
                        s = bench(fn)
                        print(f"sweep decode block_n={block_n} warps={warps} stages={stages} splits={splits}: "
                              f"{s * 1e6:.1f} us {moved / s / 1e9:.0f} GB/s", flush=True)
    finally:
        pa._decode_config = shipped
    n, length = args.prefill_seqs, args.prefill_len
    q, kc, vc, meta = paged_inputs([length] * n, [length] * n, nh, nkv, hd, device)
    flops = 4 * n * nh * hd * length * (length + 1) / 2
    shipped = pa._prefill_config
    group_pad = triton_next_pow2(nh // nkv)
    try:
        for rows in (64, 128):
            for block_n in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (2, 3):
                        pa._prefill_config = lambda *_: (max(1, rows // group_pad), block_n, warps, stages)
                        fn = lambda: pa.paged_prefill_attention(q, kc, vc, meta, scale)
                        try:
                            check("prefill sweep", fn(), q, kc, vc, meta)
                        except (Exception, SystemExit) as e:   # e.g. out of shared memory for big tiles
                            print(f"sweep prefill rows={rows} block_n={block_n} warps={warps} stages={stages}: "
                                  f"failed: {str(e).splitlines()[0][:120]}", flush=True)
                            continue
                        s = bench(fn)
                        print(f"sweep prefill rows={rows} block_n={block_n} warps={warps} stages={stages}: "
                              f"{s * 1e3:.2f} ms {flops / s / 1e12:.0f} TFLOP/s", flush=True)
    finally:
        pa._prefill_config = shipped


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def run(args: argparse.Namespace, device: torch.device, bench, num_sms: int) -> list[tuple[str, str, str, str]]:
    """Check, then time every case; one Markdown row (kernel, time, achieved, vs reference) each."""
    from lumen.engine.triton_kernels.paged_attention import (
        choose_num_splits,
        paged_decode_attention,
        paged_prefill_attention,
    )

    copy_gbs = copy_bandwidth(bench, device, args.copy_bytes)
    rows = [(f"device-to-device copy ({args.copy_bytes >> 20} MiB)", "-", f"{copy_gbs:.0f} GB/s", "100%")]
    nh, nkv, hd, scale = args.heads, args.kv_heads, args.head_dim, args.head_dim ** -0.5
    q, kc, vc, meta = paged_inputs([1] * args.batch, [args.context] * args.batch, nh, nkv, hd, device)
    check("decode", paged_decode_attention(q, kc, vc, meta, scale), q, kc, vc, meta)
    # Every K/V element of every sequence is read once; q is read and out written once.
    moved = 2 * args.batch * args.context * nkv * hd * kc.element_size() + 2 * q.nbytes
    auto = choose_num_splits(args.context, args.batch, nkv, num_sms)
    for splits in sorted({1, auto, 2 * auto}):
        seconds = bench(lambda: paged_decode_attention(q, kc, vc, meta, scale, num_splits=splits))
        label = f"Triton paged decode, splits={splits}" + (" (auto)" if splits == auto else "")
        rows.append((label, f"{seconds * 1e6:.1f} us", f"{moved / seconds / 1e9:.0f} GB/s",
                     f"{moved / seconds / 1e9 / copy_gbs:.0%} of copy"))
    seconds = sdpa_decode_time(bench, q, args.context, nkv)
    rows.append(("torch SDPA decode, contiguous K/V", f"{seconds * 1e6:.1f} us",
                 f"{moved / seconds / 1e9:.0f} GB/s", f"{moved / seconds / 1e9 / copy_gbs:.0%} of copy"))

    n, length = args.prefill_seqs, args.prefill_len
    q, kc, vc, meta = paged_inputs([length] * n, [length] * n, nh, nkv, hd, device)
    check("prefill", paged_prefill_attention(q, kc, vc, meta, scale), q, kc, vc, meta)
    flops = 4 * n * nh * hd * length * (length + 1) / 2       # QK^T and PV over the causal half
    triton_s = bench(lambda: paged_prefill_attention(q, kc, vc, meta, scale))
    sdpa_s = sdpa_prefill_time(bench, q.view(n, length, nh, hd), nkv)
    rows.append(("Triton paged prefill", f"{triton_s * 1e3:.2f} ms", f"{flops / triton_s / 1e12:.0f} TFLOP/s",
                 f"{sdpa_s / triton_s:.0%} of SDPA"))
    rows.append(("torch SDPA prefill, contiguous K/V", f"{sdpa_s * 1e3:.2f} ms",
                 f"{flops / sdpa_s / 1e12:.0f} TFLOP/s", "100% of SDPA"))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--prefill-seqs", type=int, default=8)
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--sweep", action="store_true", help="first time every tile configuration of both kernels")
    p.add_argument("--copy-bytes", type=int, default=2 << 30, help="size of the copy that sets the bandwidth roof")
    return p.parse_args(argv)


def copy_bandwidth(bench, device: torch.device, nbytes: int) -> float:
    """GB/s of a large device-to-device copy, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = bench(lambda: dst.copy_(src))
    return 2 * nbytes / seconds / 1e9


def paged_inputs(query_lens: list[int], seq_lens: list[int], nh: int, nkv: int, hd: int, device: torch.device):
    """Random fp16 q and caches whose blocks are handed out in a shuffled order, as after churn."""
    per_seq = [-(-s // BLOCK_SIZE) for s in seq_lens]
    pool = torch.randperm(sum(per_seq)).tolist()
    tables = [pool[sum(per_seq[:i]): sum(per_seq[: i + 1])] for i in range(len(per_seq))]
    shape = (sum(per_seq), BLOCK_SIZE, nkv, hd)                  # [num_blocks, block_size, nkv, hd]
    k_cache = torch.randn(shape, dtype=torch.float16, device=device)
    v_cache = torch.randn(shape, dtype=torch.float16, device=device)
    q = torch.randn((sum(query_lens), nh, hd), dtype=torch.float16, device=device)   # [num_tokens, nh, hd]
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, BLOCK_SIZE).to(device)
    return q, k_cache, v_cache, meta


def check(what: str, out: torch.Tensor, q, k_cache, v_cache, meta: AttentionMetadata) -> None:
    """The kernel must agree with the torch backend before its speed means anything."""
    ref = TorchAttention().forward(q, k_cache, v_cache, meta, q.shape[-1] ** -0.5)
    err = (out.float() - ref.float()).abs().max().item()
    if not err < 2e-2:
        raise SystemExit(f"{what}: Triton and torch attention differ by {err:.3g}; not benchmarking a wrong kernel")


def sdpa_decode_time(bench, q: torch.Tensor, context: int, nkv: int) -> float:
    """SDPA on the same decode step with K/V already contiguous per sequence (no paging)."""
    batch, nh, hd = q.shape
    k = torch.randn((batch, nkv, context, hd), dtype=q.dtype, device=q.device)
    v = torch.randn_like(k)
    qs = q.view(batch, nh, 1, hd)
    return bench(lambda: F.scaled_dot_product_attention(qs, k, v, scale=hd ** -0.5, enable_gqa=True))


def sdpa_prefill_time(bench, q: torch.Tensor, nkv: int) -> float:
    """Causal SDPA, q [n, length, nh, hd]; K/V pre-expanded to nh heads so the flash kernel runs."""
    n, length, nh, hd = q.shape
    qs = q.transpose(1, 2).contiguous()                            # [n, nh, length, hd]
    k = torch.randn((n, nkv, length, hd), dtype=q.dtype, device=q.device).repeat_interleave(nh // nkv, dim=1)
    v = torch.randn_like(k)
    return bench(lambda: F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=hd ** -0.5))


def print_table(device_name: str, args: argparse.Namespace, rows: list[tuple[str, str, str, str]]) -> None:
    print(f"### Paged attention on {device_name}, fp16, {args.heads} query / {args.kv_heads} KV heads, "
          f"head {args.head_dim}, block {BLOCK_SIZE}\n")
    print(f"Decode: batch {args.batch} x context {args.context}. "
          f"Prefill: {args.prefill_seqs} x {args.prefill_len} tokens, causal.\n")
    print("| kernel | time | achieved | vs reference |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
