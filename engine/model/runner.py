"""The model runner: the one owner of the device a model computes on.

It holds the model's weights there (device_weights), the paged KV pool, the attention backend;
stages each step's inputs (pinned host memory, non-blocking copies), runs the forward (replaying
a CUDA graph for decode steps on a GPU) and, on the Triton placement, samples the whole batch on
the device (sampling.batched) and verifies speculative drafts there (greedy argmax,
sampling.device_verify), with ONE host synchronisation for all the tokens, logprobs and verdicts
(a second only in steps with rows the host must see: prompt logprobs, drafts under a repetition
penalty or with logprobs). The scheduler, block manager and sequences never see a device tensor.

On the CPU with the C kernels ("native") it is what the engine always did: weights as loaded,
the C layer kernels, each sequence sampling its own row (bit-exact with earlier releases).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from lumen.engine.lora.registry import LoraConfig, LoraRegistry
from lumen.engine.model.attention import AttentionMetadata
from lumen.engine.model.attention.select import select_backend
from lumen.engine.model.config import ModelConfig
from lumen.engine.model.cuda_graphs import DecodeGraphs
from lumen.engine.model.device_weights import weights_nbytes, weights_on
from lumen.engine.model.kv_cache import KVCachePool, KVCacheSpec
from lumen.engine.model.llama import ForwardBatch, LlamaModel
from lumen.engine.model.placement import CPU_NATIVE, Placement
from lumen.engine.sampling.device_verify import DraftRows, verdicts, verify_on_device
from lumen.engine.sampling.logprobs import TokenLogprob, logprob_tensors, unpack_logprobs
from lumen.engine.sampling.rejection import verify_greedy_choices
from lumen.engine.weights.loaded_model import LoadedModel

if TYPE_CHECKING:
    from lumen.engine.core.scheduler import ScheduledSeq

log = logging.getLogger(__name__)

# Kept free on a GPU beyond the step's own activations: the CUDA context's allocations outside
# torch, allocator fragmentation and Triton's launch scratch (vLLM keeps a similar margin).
GPU_RESERVE_BYTES = 512 << 20


@dataclass(frozen=True, slots=True)
class KVSizing:
    """How big the KV pool may be: `cache_bytes` on the CPU, `gpu_memory_utilization` of the
    GPU's memory (weights and activations included) on CUDA, or `cache_bytes` there too when it
    is None (a draft model's pool); at most `max_tokens` tokens."""
    cache_bytes: int
    gpu_memory_utilization: float | None
    block_size: int
    max_tokens: int
    max_tokens_per_step: int


@dataclass(slots=True)
class RowResult:
    """What a scheduled sequence gets from a step: its logits rows on the host (empty when it
    needs none) and, when the runner sampled for it, the token and (if it wants them) its logprobs."""
    logits: torch.Tensor
    token: int | None = None
    logprob: TokenLogprob | None = None
    verdict: tuple[list[int], int] | None = None   # a draft verified on the device: (tokens, accepted)


class ModelRunner:
    def __init__(self, loaded: LoadedModel, placement: Placement | None, sizing: KVSizing,
                 graph_batch: int = 0, graph_capture: bool = True, lora: LoraConfig | None = None) -> None:
        """graph_batch: the most sequences a decode step holds, when decode steps run as CUDA graphs
        (0: never); graph_capture=False replays them eagerly (cuda_graphs.DecodeGraphs, for tests).
        lora: how many LoRA adapters, of what rank, the model may hold (on its device, in its dtype)."""
        self.placement = placement = placement or CPU_NATIVE
        cfg = loaded.config
        native = placement.kernels == "native"
        if native:
            if placement.device.type != "cpu" or placement.dtype != loaded.weights.dtype:
                raise ValueError(f"the native kernels compute on the CPU in the loaded dtype "
                                 f"({loaded.weights.dtype}), not {placement.describe()}")
            weights, attention = loaded.weights, select_backend(torch.device("cpu"))
        else:
            attention = _triton_attention(placement)
            weights = weights_on(loaded.weights, placement)
        spec = KVCacheSpec.from_budget(cfg, placement.dtype, self._kv_budget(cfg, sizing), sizing.block_size,
                                       max_tokens=sizing.max_tokens)
        self.kv_spec = spec                      # the blocks the engine's BlockManager hands out
        graphs = graph_batch > 0 and not native
        # CUDA graphs pad a step with rows that write their K/V into one more block, owned by no one.
        pool_spec = KVCacheSpec(spec.block_size, spec.num_blocks + 1) if graphs else spec
        self.kv = KVCachePool(cfg, pool_spec, placement.dtype, placement.device)
        self.model = LlamaModel(cfg, weights, self.kv, attention, native_kernels=native)
        self.graphs = None
        if graphs:
            for cache in self.kv.keys + self.kv.values:
                cache[spec.num_blocks].zero_()
            self.graphs = DecodeGraphs(self.model, graph_batch, min(cfg.context_length, spec.num_blocks * spec.block_size),
                                       spec.block_size, spec.num_blocks, graph_capture)
        # LoRA adapters live beside the weights; the Triton kernels read them stacked.
        self.lora = LoraRegistry(cfg, lora or LoraConfig(), placement.device, placement.dtype, stacked=not native)
        # The bytes the weights hold on the device (0 for the native placement: they stay as loaded).
        self.weights_bytes = 0 if native else weights_nbytes(weights)
        log.info("model %s on %s: KV pool %d blocks of %d tokens (%.1f MiB)%s%s", loaded.name, placement.describe(),
                 spec.num_blocks, spec.block_size, self.kv.nbytes / 2**20,
                 f", weights {self.weights_bytes / 2**20:.1f} MiB on the device" if self.weights_bytes else "",
                 f", CUDA graphs for decode batches of {self.graphs.sizes}" if self.graphs and graph_capture else "")

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    def _kv_budget(self, cfg: ModelConfig, sizing: KVSizing) -> int:
        if not self.placement.on_cuda or sizing.gpu_memory_utilization is None:
            return sizing.cache_bytes
        if not 0 < sizing.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {sizing.gpu_memory_utilization}")
        free, total = torch.cuda.mem_get_info(self.placement.device)
        element = torch.empty((), dtype=self.placement.dtype).element_size()
        # The widest activations a step holds at once, and its logits with the sampler's copies.
        step = sizing.max_tokens_per_step * element * (2 * cfg.ffn_dim + 3 * cfg.dim +
                                                       (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim)
        logits = sizing.max_tokens_per_step * cfg.vocab_size * 4 * 3
        budget = int(total * sizing.gpu_memory_utilization) - (total - free) - step - logits - GPU_RESERVE_BYTES
        if budget <= 0:
            raise ValueError(f"no GPU memory is left for the KV cache: {total / 2**30:.1f} GiB x "
                             f"{sizing.gpu_memory_utilization} minus {(total - free) / 2**30:.1f} GiB in use "
                             f"(weights) and the step's activations; raise --gpu-memory-utilization or serve a "
                             f"smaller model")
        return budget

    def stage(self, batch: ForwardBatch) -> ForwardBatch:
        """The step's inputs on the device: pinned host copies, copied without waiting."""
        if self.placement.device.type == "cpu":
            return batch
        dev = self.placement.device

        def copy(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory().to(dev, non_blocking=True)

        a = batch.attn
        attn = AttentionMetadata(copy(a.query_start_loc), copy(a.seq_lens), copy(a.block_tables),
                                 copy(a.slot_mapping), a.block_size, a.max_query_len, a.max_seq_len,
                                 a.query_lens_list, a.seq_lens_list)
        lora = batch.lora.to(dev, batch.lora.stack) if batch.lora is not None else None
        return ForwardBatch(copy(batch.token_ids), copy(batch.positions), attn, copy(batch.logits_indices), lora)

    def forward(self, batch: ForwardBatch, num_layers: int | None = None) -> torch.Tensor:
        """float32 logits [num_logits, vocab] on the device (num_layers: the layer-skip draft)."""
        if batch.lora is not None:   # adapted rows: the loaded adapters as they are now
            batch.lora.stack = self.lora.stack
        if self.graphs is not None and num_layers is None and self.graphs.fits(batch):
            return self.graphs.run(batch)
        return self.model.forward(self.stage(batch), num_layers)

    def host_logits(self, batch: ForwardBatch, num_layers: int | None = None) -> torch.Tensor:
        """forward() with the logits on the host (the speculative proposers sample there)."""
        return self.forward(batch, num_layers).cpu()

    def sample(self, scheduled: list["ScheduledSeq"], rows: list[tuple[int, int]],
               logits: torch.Tensor) -> list[RowResult]:
        """Each scheduled sequence's result from the step's logits (rows[i]: its [first, last))."""
        if self.placement.kernels == "native":   # each sequence samples its own row, as always
            return [RowResult(logits[first:last]) for first, last in rows]
        no_rows = logits.new_empty((1, 0), device="cpu")   # for sequences that read no logits
        results = [RowResult(no_rows) for _ in scheduled]
        kinds = [_row_kind(item.seq, item.num_new) if last > first else "" for item, (first, last)
                 in zip(scheduled, rows)]
        pieces: list[tuple[torch.Tensor, Callable[[list[float]], None]]] = []
        plain = [i for i, kind in enumerate(kinds) if kind == "plain"]
        if plain:
            pieces += self._sample_plain(plain, [scheduled[i].seq for i in plain], rows, logits, results)
        greedy = [i for i, kind in enumerate(kinds) if kind == "greedy_verify"]
        if greedy:
            pieces.append(_greedy_choices(greedy, [scheduled[i].seq for i in greedy], rows, logits, results))
        sampled = [i for i, kind in enumerate(kinds) if kind == "sampled_verify"]
        if sampled:
            pieces.append(_sampled_verdicts(sampled, [scheduled[i].seq for i in sampled], rows, logits, results))
        if pieces:   # the step's one synchronisation: every token and logprob in one read
            flat = torch.cat([tensor for tensor, _ in pieces]).tolist()
            offset = 0
            for tensor, read in pieces:
                read(flat[offset:offset + tensor.numel()])
                offset += tensor.numel()
        host = [i for i, kind in enumerate(kinds) if kind == "host"]
        if host:   # sampled drafts to verify, prompts to score: the host reads these rows
            index = torch.tensor([r for i in host for r in range(*rows[i])], device=logits.device)
            copied = logits.index_select(0, index).cpu()
            offset = 0
            for i in host:
                n = rows[i][1] - rows[i][0]
                results[i].logits, offset = copied[offset:offset + n], offset + n
        return results

    def _sample_plain(self, picks: list[int], seqs: list, rows: list[tuple[int, int]], logits: torch.Tensor,
                      results: list[RowResult]) -> list[tuple[torch.Tensor, Callable[[list[float]], None]]]:
        """One token for each picked sequence from its last row, with its logprobs when it wants
        them: (device tensor, what to do with its values once read) pairs."""
        from lumen.engine.sampling.batched import sample_rows
        last_rows = torch.tensor([rows[i][1] - 1 for i in picks], device=logits.device)
        picked = logits.index_select(0, last_rows)
        tokens = sample_rows(picked, [s.sampler for s in seqs], [s.token_ids for s in seqs])

        def read_tokens(values: list[float]) -> None:
            for i, token in zip(picks, values):
                results[i].token = int(token)

        pieces = [(tokens.to(torch.float32), read_tokens)]
        scored = [j for j, s in enumerate(seqs) if s.wants_logprobs()]
        if scored:
            which = torch.tensor(scored, device=logits.device)
            top_n = max(seqs[j].request.top_logprobs for j in scored)
            tensors = logprob_tensors(picked.index_select(0, which), tokens.index_select(0, which), top_n)

            def read_logprobs(values: list[float]) -> None:
                logprobs = unpack_logprobs([results[picks[j]].token for j in scored], values,
                                           [seqs[j].request.top_logprobs for j in scored], top_n)
                for j, logprob in zip(scored, logprobs):
                    results[picks[j]].logprob = logprob

            pieces.append((torch.cat(tensors), read_logprobs))
        return pieces


def _row_kind(seq, num_new: int) -> str:
    """How the runner serves a sequence's rows: "plain" (it samples the next token on the device),
    "greedy_verify" / "sampled_verify" (its draft is verified on the device), or "host" (its rows
    are copied to the host: drafts under a repetition penalty, logprobs of drafts, prompt logprobs)."""
    if seq.samples_next(num_new):
        return "plain"
    params = seq.sampler.params
    if (seq.draft is not None and params.repetition_penalty == 1.0 and not seq.wants_logprobs()
            and not seq.wants_prompt_logprobs()):
        return "greedy_verify" if params.greedy else "sampled_verify"
    return "host"


def _greedy_choices(picks: list[int], seqs: list, rows: list[tuple[int, int]], logits: torch.Tensor,
                    results: list[RowResult]) -> tuple[torch.Tensor, Callable[[list[float]], None]]:
    """The target's own greedy choice at every row of the picked sequences (what verification
    compares a greedy draft with), as one argmax over all their rows."""
    index = torch.tensor([r for i in picks for r in range(*rows[i])], device=logits.device)
    choices = logits.index_select(0, index).argmax(dim=-1).to(torch.float32)

    def read(values: list[float]) -> None:
        offset = 0
        for i, seq in zip(picks, seqs):
            n = rows[i][1] - rows[i][0]
            results[i].verdict = verify_greedy_choices([int(v) for v in values[offset:offset + n]],
                                                       seq.draft.tokens)
            offset += n

    return choices, read


def _sampled_verdicts(picks: list[int], seqs: list, rows: list[tuple[int, int]], logits: torch.Tensor,
                      results: list[RowResult]) -> tuple[torch.Tensor, Callable[[list[float]], None]]:
    """Sampled drafts verified on the device (sampling.device_verify)."""
    drafts = [DraftRows(seq.sampler, seq.draft.tokens, seq.draft.probs, rows[i][0]) for i, seq in zip(picks, seqs)]
    flat = verify_on_device(logits, drafts)

    def read(values: list[float]) -> None:
        for i, verdict in zip(picks, verdicts(drafts, values)):
            results[i].verdict = verdict

    return flat, read


def _triton_attention(placement: Placement):
    from lumen.engine.model.attention.triton_backend import TritonAttention
    from lumen.engine.triton_kernels import paged_attention, quant_matmul
    if placement.device.type == "cpu" and not (paged_attention.INTERPRETED and quant_matmul.INTERPRETED):
        raise ValueError("--kernels triton on --device cpu: the Triton kernels were imported without "
                         "TRITON_INTERPRET=1; set it in the environment before the server starts")
    return TritonAttention()
