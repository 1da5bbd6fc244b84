"""The models a server serves, each with its own engine thread."""
from __future__ import annotations

from dataclasses import dataclass

from lumen.engine.core.async_engine import AsyncEngine
from lumen.engine.errors import ModelNotFoundError, quoted
from lumen.engine.model.placement import Placement
from lumen.engine.weights.loaded_model import LoadedModel


@dataclass(slots=True)
class ModelRuntime:
    name: str
    model: LoadedModel
    engine: AsyncEngine

    @property
    def placement(self) -> Placement:
        """Where its engine computes (device, kernels, dtype)."""
        return self.engine.engine.runner.placement

    @property
    def max_prompt_bytes(self) -> int:
        """The most prompt text that could fit the context: no token is longer than the longest."""
        return self.model.config.context_length * self.model.tokenizer.max_token_bytes


class ModelRegistry:
    def __init__(self, runtimes: list[ModelRuntime]) -> None:
        if not runtimes:
            raise ValueError("a server needs at least one model")
        self._by_name = {}
        for rt in runtimes:
            if rt.name in self._by_name:
                raise ValueError(f"two models are named {rt.name!r}; name them with --model NAME=PATH")
            self._by_name[rt.name] = rt
        self.default = runtimes[0]

    def get(self, name: str) -> ModelRuntime:
        """Empty name = the default model."""
        if not name:
            return self.default
        rt = self._by_name.get(name)
        if rt is None:
            served = ", ".join(sorted(self._by_name))
            raise ModelNotFoundError(f"model {quoted(name)} is not served here (served: {served}); see ListModels")
        return rt

    def __iter__(self):
        return iter(self._by_name.values())

    def shutdown(self) -> None:
        for rt in self._by_name.values():
            rt.engine.shutdown()
