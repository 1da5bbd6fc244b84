"""Speculative decoding: proposers that guess the next tokens cheaply, and the verifier that
keeps exactly the target model's output distribution (engine/sampling/rejection.py)."""
from lumen.engine.speculative.config import SpecMethod, SpeculativeConfig, SpeculativeParams
from lumen.engine.speculative.draft import Draft

__all__ = ["Draft", "SpecMethod", "SpeculativeConfig", "SpeculativeParams"]
