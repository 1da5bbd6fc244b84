"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, min-p and
repetition penalty. A given seed gives the same output every time."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from lumen.engine.errors import InvalidRequestError

# vLLM raises temperatures below 0.01 to 0.01; Lumen refuses them instead of changing the request.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
MIN_PENALTY, MAX_PENALTY = 0.01, 100.0
# The API's floats are float32: 0.01 arrives as 0.0099999998. The bounds allow that rounding.
_F32_ROUNDING = 1 - 1e-6


@dataclass(slots=True, frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        t, penalty = self.temperature, self.repetition_penalty
        # Outside these ranges the sampler's float32 arithmetic overflows (logits / 1e-40 is inf).
        if not (t == 0 or _F32_ROUNDING * MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
            raise InvalidRequestError("sampling.temperature", f"must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, "
                                                              f"{MAX_TEMPERATURE:g}], got {t}")
        if self.top_k < 0:
            raise InvalidRequestError("sampling.top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise InvalidRequestError("sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        if not (0 <= self.min_p <= 1):
            raise InvalidRequestError("sampling.min_p", f"must be in [0, 1], got {self.min_p}")
        if not _F32_ROUNDING * MIN_PENALTY <= penalty <= MAX_PENALTY:
            raise InvalidRequestError("sampling.repetition_penalty", f"must be in [{MIN_PENALTY:g}, {MAX_PENALTY:g}] "
                                                                     f"(1 = off), got {penalty}")
        if self.seed is not None and not (0 <= self.seed < 2**64):
            raise InvalidRequestError("sampling.seed", f"must be in [0, 2^64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Per-request sampler; owns the request's random generator."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator()
        # torch seeds are 64-bit signed-safe below 2^63; fold larger seeds in deterministically.
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator.manual_seed(seed % (2**63))
        self._device_generator: torch.Generator | None = None

    def generator_on(self, device: torch.device) -> torch.Generator:
        """This request's generator for noise drawn on `device`: the CPU generator itself, or one
        made once on the accelerator with the same seed, so batched sampling never copies noise."""
        if torch.device(device).type == "cpu":
            return self.generator
        if self._device_generator is None:
            self._device_generator = torch.Generator(device=device)
            self._device_generator.manual_seed(self.generator.initial_seed())
        return self._device_generator

    def sample(self, logits: torch.Tensor, history: list[int]) -> int:
        """Pick the next token from fp32 logits [vocab]; `history` = prompt + output ids."""
        probs = self.distribution(logits, history)
        if probs is None:
            return self.greedy_token(logits, history)
        return self.draw(probs)

    def greedy_token(self, logits: torch.Tensor, history: list[int]) -> int:
        p = self.params
        if p.repetition_penalty != 1.0 and history:
            logits = apply_repetition_penalty(logits, history, p.repetition_penalty)
        return int(torch.argmax(logits))

    def distribution(self, logits: torch.Tensor, history: list[int]) -> torch.Tensor | None:
        """The probabilities [vocab] this sampler draws from after every filter (None when greedy).

        Speculative decoding scores drafts against exactly this distribution, for the draft
        model and the target alike."""
        p = self.params
        if p.greedy:
            return None
        if p.repetition_penalty != 1.0 and history:
            logits = apply_repetition_penalty(logits, history, p.repetition_penalty)
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, -math.inf)
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            probs = _top_p_filter(probs, p.top_p)
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return probs

    def draw(self, probs: torch.Tensor) -> int:
        """A token drawn from (unnormalized) probabilities with this request's generator."""
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def uniform(self) -> float:
        """A draw from U[0, 1) with this request's generator."""
        return float(torch.rand((), generator=self.generator))


def apply_repetition_penalty(logits: torch.Tensor, history: list[int], penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as HF and llama.cpp): shrink positive logits, grow negative ones."""
    ids = torch.tensor(sorted(set(history)), dtype=torch.long)
    seen = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    drop = (cumulative - sorted_probs) >= top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)
