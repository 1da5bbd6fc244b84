"""Choosing tokens from logits: the sampler, logprobs, and rejection sampling for speculative drafts."""
