"""Drafting with a model, batched over every speculating sequence of a step.

Round 0 feeds each sequence's tokens that the drafting model has not computed yet (its
whole prompt the first time, then the tokens the last verification kept) and drafts one
token; each later round feeds the previous draft token and drafts the next, for all
sequences at once, until each has its k tokens.

Two kinds, one loop:
- `DraftModelProposer`: a second, smaller GGUF with the target's vocabulary, its own KV
  pool and block manager. What its cache holds is tracked per sequence and rolled back to
  the tokens verification kept.
- `LayerSkipProposer`: the target's first layers plus its final norm and output head
  (self-speculation, no extra file). It reads and writes the target's own KV cache for
  those layers: the target's entries are exactly what the draft layers would compute, and
  the draft's writes at uncomputed positions are overwritten when the target verifies.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from lumen.engine.core.block_manager import BlockManager
from lumen.engine.core.sequence import Sequence
from lumen.engine.model.llama import Chunk, build_batch
from lumen.engine.model.placement import Placement
from lumen.engine.model.runner import KVSizing, ModelRunner
from lumen.engine.speculative.draft import Draft
from lumen.engine.weights.loaded_model import LoadedModel


class ModelProposer(ABC):
    def __init__(self, runner: ModelRunner, blocks: BlockManager, num_layers: int | None,
                 context_length: int) -> None:
        self.runner = runner
        self.blocks = blocks
        self.num_layers = num_layers
        self.context_length = context_length

    def propose(self, items: list[tuple[Sequence, int]]) -> None:
        """Give each (sequence, k) a draft of up to k tokens (fewer when blocks or context run out)."""
        states = [(seq, self._state(seq), k) for seq, k in items]
        drafts = {seq.request_id: Draft([], None if seq.sampler.params.greedy else []) for seq, _, _ in states}
        active = states
        for round_ in range(max((k for _, _, k in states), default=0)):
            chunks, fed = [], []
            for seq, state, k in active:
                draft = drafts[seq.request_id]
                if round_ == 0:
                    feed, start = seq.token_ids[state.num_computed:], state.num_computed
                else:
                    feed, start = draft.tokens[-1:], len(seq.token_ids) + round_ - 1
                end = start + len(feed)
                if end > self.context_length or not self._grow(state, end):
                    continue
                chunks.append(Chunk(feed, start, state.block_table, range(len(feed) - 1, len(feed)),
                                    self._lora(seq)))
                fed.append((seq, state, k, end))
            if not chunks:
                break
            batch, _ = build_batch(chunks, self.blocks.block_size)
            logits = self.runner.host_logits(batch, self.num_layers)   # drafts are drawn on the host
            active = []
            for row, (seq, state, k, end) in enumerate(fed):
                state.num_computed = end
                self._draw(seq, drafts[seq.request_id], logits[row])
                if len(drafts[seq.request_id].tokens) < k:
                    active.append((seq, state, k))
        for seq, state, _ in states:
            draft = drafts[seq.request_id]
            self._drafted(seq, state, draft)
            if draft.tokens:
                if draft.probs is not None:
                    draft.probs = torch.stack(draft.probs)
                seq.draft = draft

    @staticmethod
    def _draw(seq: Sequence, draft: Draft, logits: torch.Tensor) -> None:
        """The next draft token, from the draft's distribution under the request's own sampler."""
        history = seq.token_ids + draft.tokens if seq.sampler.params.repetition_penalty != 1.0 else seq.token_ids
        q = seq.sampler.distribution(logits, history)
        if q is None:
            draft.tokens.append(seq.sampler.greedy_token(logits, history))
            return
        q = q / q.sum()
        draft.tokens.append(seq.sampler.draw(q))
        draft.probs.append(q)

    @staticmethod
    def _lora(seq: Sequence):
        """The LoRA adapter the drafts run with: the request's own (layer skip drafts with the target)."""
        return seq.lora_rows

    # What differs between the two kinds: where a sequence's drafting KV state lives.
    @abstractmethod
    def _state(self, seq: Sequence):
        """The sequence's drafting KV state (block_table, num_computed), rolled back to what is valid."""

    def _grow(self, state, num_tokens: int) -> bool:
        """Blocks for the first num_tokens positions of the drafting cache, if there are enough."""
        if not self.blocks.can_grow(state, num_tokens):
            return False
        self.blocks.grow(state, num_tokens)
        return True

    def _drafted(self, seq: Sequence, state, draft: Draft) -> None:
        """Called once drafting for seq is over."""

    def release(self, seq: Sequence) -> None:
        """The sequence finished, was aborted or preempted: free what drafting holds for it."""

    def check_invariants(self, seqs: list[Sequence]) -> None:
        """Raise AssertionError if drafting leaked or miscounted a block."""


class LayerSkipProposer(ModelProposer):
    """The target's first `num_layers` layers as the draft, on the target's KV cache."""

    def __init__(self, target: ModelRunner, blocks: BlockManager, num_layers: int, context_length: int) -> None:
        if not 1 <= num_layers < target.cfg.n_layers:
            raise ValueError(f"layer-skip drafting needs 1 to {target.cfg.n_layers - 1} layers of this "
                             f"{target.cfg.n_layers}-layer model, got {num_layers}")
        super().__init__(target, blocks, num_layers, context_length)

    def _state(self, seq: Sequence) -> "_TargetView":
        # The draft layers' cache IS the target's: valid up to what the target computed.
        return _TargetView(seq)


class _TargetView:
    """The target sequence's block table (the same list: growing it grows the target's),
    with a drafting position of its own."""
    __slots__ = ("block_table", "num_computed")

    def __init__(self, seq: Sequence) -> None:
        self.block_table = seq.block_table
        self.num_computed = seq.num_computed


@dataclass(slots=True)
class _DraftSeq:
    """What the draft model's cache holds for one sequence (the BlockManager's HasBlocks)."""
    token_ids: list[int]                 # the target sequence's tokens (prefix caching is off here)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    cache_salt: object = None
    num_computed: int = 0
    base: int = 0                        # tokens that were the target's own when the last draft was made
    fed: list[int] = field(default_factory=list)  # draft tokens computed after `base`, in order


class DraftModelProposer(ModelProposer):
    """A separate draft model with its own paged KV pool (never with a LoRA adapter: the engine
    refuses 'draft' for a request that names one)."""

    @staticmethod
    def _lora(seq: Sequence):
        """None: the draft model has no adapter (the target's would not even fit its shapes)."""
        return None

    def __init__(self, draft: LoadedModel, target: LoadedModel, placement: Placement, block_size: int,
                 max_tokens: int, memory_bytes: int) -> None:
        """The draft runs where the target does (placement), with a KV pool of memory_bytes."""
        check_same_vocabulary(draft, target)
        runner = ModelRunner(draft, placement, KVSizing(memory_bytes, None, block_size, max_tokens, max_tokens))
        super().__init__(runner, BlockManager(runner.kv_spec.num_blocks, block_size, prefix_caching=False), None,
                         draft.config.context_length)
        self.states: dict[str, _DraftSeq] = {}

    def _state(self, seq: Sequence) -> _DraftSeq:
        state = self.states.get(seq.request_id)
        if state is None:
            state = self.states[seq.request_id] = _DraftSeq(seq.token_ids)
            return state
        # Roll back to what verification kept: the base, then the fed draft tokens it accepted.
        valid = state.base
        for token in state.fed:
            if valid >= len(seq.token_ids) or seq.token_ids[valid] != token:
                break
            valid += 1
        # Feed at least the last token: its logits give the first draft token. (All of the cached
        # tokens can be valid when a cut draft's bonus token equals the next one the draft fed.)
        state.num_computed = min(state.num_computed, valid, len(seq.token_ids) - 1)
        state.token_ids = seq.token_ids
        self.blocks.trim(state, state.num_computed)
        return state

    def _drafted(self, seq: Sequence, state: _DraftSeq, draft: Draft) -> None:
        state.base = len(seq.token_ids)
        state.fed = draft.tokens[: max(0, state.num_computed - state.base)]

    def release(self, seq: Sequence) -> None:
        state = self.states.pop(seq.request_id, None)
        if state is not None:
            self.blocks.release(state)

    def check_invariants(self, seqs: list[Sequence]) -> None:
        live = {seq.request_id for seq in seqs}
        assert set(self.states) <= live, f"draft state kept for finished requests {set(self.states) - live}"
        self.blocks.check_invariants(self.states.values())


def check_same_vocabulary(draft: LoadedModel, target: LoadedModel) -> None:
    """Refuse a draft whose token ids mean other tokens than the target's."""
    a, b = draft.tokenizer, target.tokenizer
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft model {draft.path} has a vocabulary of {draft.config.vocab_size} tokens, the "
                         f"target {target.path} one of {target.config.vocab_size}: speculative decoding needs "
                         "the same vocabulary; use a draft trained with the target's tokenizer")
    for token_id in range(draft.config.vocab_size):
        if a.token_bytes(token_id) != b.token_bytes(token_id):
            raise ValueError(f"draft model {draft.path} and target {target.path} differ at token {token_id} "
                             f"({a.token_bytes(token_id)!r} vs {b.token_bytes(token_id)!r}): speculative decoding "
                             "needs the same vocabulary; use a draft trained with the target's tokenizer")
