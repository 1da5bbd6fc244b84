"""CUDA graphs of decode steps: one graph per batch size of a ladder, replayed instead of launching
every kernel of the forward one by one (for a small model the launches are most of a step).

A decode step (every sequence brings one token and wants its logits) of n sequences replays the
graph of the smallest ladder size >= n. Its inputs go into static device buffers that every
graph reads: rows past n are padding, whose token writes its K/V into a block no sequence owns
(the runner's pad block) and whose attention reads only that block, so it can change no real
row (every kernel computes rows independently). Attention is captured for the longest context
(`max_seq_len`): its split-KV kernel takes each sequence's length from the device, and splits
past a sequence's end do nothing. Kernels allocate their scratch inside the capture, from the
graphs' shared memory pool, which replays reuse.

Sampling stays outside the graph. With `capture=False` (tests on a CPU device, under the Triton
interpreter) "replay" runs the forward over the same static buffers eagerly: the padding and
buffer logic is the same, only the capture is not (gpu_check compares graphs with eager on CUDA).
"""
from __future__ import annotations

import torch

from lumen.engine.model.attention import AttentionMetadata
from lumen.engine.model.llama import ForwardBatch, LlamaModel


def batch_size_ladder(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_batch (vLLM's ladder), and max_batch itself."""
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch, 8))
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    def __init__(self, model: LlamaModel, max_batch: int, max_seq_len: int, block_size: int, pad_block: int,
                 capture: bool = True) -> None:
        dev = model.w.norm.device
        self.model, self.block_size, self.max_seq_len = model, block_size, max_seq_len
        self.sizes = batch_size_ladder(max_batch)
        self.width = -(-max_seq_len // block_size)     # block-table columns of the longest context
        self.pad_block = pad_block
        self.token_ids = torch.empty(max_batch, dtype=torch.long, device=dev)
        self.positions = torch.empty(max_batch, dtype=torch.long, device=dev)
        self.slots = torch.empty(max_batch, dtype=torch.long, device=dev)
        self.seq_lens = torch.empty(max_batch, dtype=torch.int32, device=dev)
        self.block_tables = torch.empty((max_batch, self.width), dtype=torch.int32, device=dev)
        self._pad(0, max_batch)
        self.query_start = torch.arange(max_batch + 1, dtype=torch.int32, device=dev)
        self.rows = torch.arange(max_batch, dtype=torch.long, device=dev)
        self.capture = capture
        self.graphs: dict[int, tuple[object, torch.Tensor]] = {}
        if capture:
            self._capture_all()

    def _static_batch(self, size: int) -> ForwardBatch:
        attn = AttentionMetadata(self.query_start[:size + 1], self.seq_lens[:size], self.block_tables[:size],
                                 self.slots[:size], self.block_size, 1, self.max_seq_len, [1] * size,
                                 [self.max_seq_len] * size)
        return ForwardBatch(self.token_ids[:size], self.positions[:size], attn, self.rows[:size])

    def _capture_all(self) -> None:
        pool = None
        for size in reversed(self.sizes):          # largest first: smaller graphs fit in its pool
            batch = self._static_batch(size)
            self.model.forward(batch)              # compiles the kernels for this shape outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.model.forward(batch)
            pool = graph.pool()
            self.graphs[size] = (graph, logits)
        torch.cuda.synchronize()

    def fits(self, batch: ForwardBatch) -> bool:
        """Whether `batch` (on the host) is a decode step a graph can run (without LoRA rows: the
        adapters' gathers are not captured)."""
        a = batch.attn
        n = a.num_seqs
        return (batch.lora is None and 0 < n <= self.sizes[-1] and a.max_query_len == 1 and batch.token_ids.shape[0] == n
                and batch.logits_indices.shape[0] == n and a.max_seq_len <= self.max_seq_len
                and a.block_tables.shape[1] <= self.width)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """The logits [n, vocab] of decode step `batch` (host tensors; fits() must hold)."""
        n = batch.attn.num_seqs
        size = next(s for s in self.sizes if s >= n)
        self._fill(batch, n, size)
        if not self.capture:
            return self.model.forward(self._static_batch(size))[:n]
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:n]

    def _fill(self, batch: ForwardBatch, n: int, size: int) -> None:
        """Real rows from the batch, rows n..size-1 as padding (pinned, non-blocking copies)."""
        a = batch.attn
        pin = self.token_ids.is_cuda

        def put(dst: torch.Tensor, src: torch.Tensor) -> None:
            dst.copy_(src.pin_memory() if pin else src, non_blocking=pin)

        put(self.token_ids[:n], batch.token_ids)
        put(self.positions[:n], batch.positions)
        put(self.slots[:n], a.slot_mapping)
        put(self.seq_lens[:n], a.seq_lens)
        put(self.block_tables[:n, :a.block_tables.shape[1]], a.block_tables)
        if size > n:
            self._pad(n, size)

    def _pad(self, start: int, stop: int) -> None:
        """Rows start..stop-1 as padding: token 0 at position 0, one token of context, all in the pad block."""
        self.token_ids[start:stop] = 0
        self.positions[start:stop] = 0
        self.slots[start:stop] = self.pad_block * self.block_size
        self.seq_lens[start:stop] = 1
        self.block_tables[start:stop] = self.pad_block
