"""The adapters one model's engine serves: loaded, used by requests, unloaded.

Reading a file (`read`) touches no state and may run on any thread; everything else runs on
the engine's thread, between steps, so a step never sees the set change under it. An adapter
in use by a request is never unloaded under it: `remove` refuses (FAILED_PRECONDITION) until
its requests have finished, and `acquire`/`release` count them.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lumen.engine.errors import FailedPreconditionError, InvalidRequestError, LumenError, quoted
from lumen.engine.lora.adapter import LoraAdapter, load_adapter
from lumen.engine.lora.weights import AdapterWeights, LoraStack, group_weights, native_layers
from lumen.engine.model.config import ModelConfig
from lumen.engine.native import kernels as native

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,63}")
_UIDS = itertools.count(1)


class AdapterNotFoundError(LumenError):
    """A request or call names an adapter that is not loaded (gRPC NOT_FOUND)."""


class AdapterExistsError(LumenError):
    """An adapter of that name is already loaded (gRPC ALREADY_EXISTS)."""


@dataclass(slots=True)
class LoraConfig:
    max_loras: int = 8      # adapters loaded at once, per model
    max_rank: int = 64      # the largest rank an adapter may have

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {self.max_rank}")


@dataclass(slots=True)
class LoadedAdapter:
    name: str
    path: Path
    format: str
    rank: int
    alpha: float
    targets: list[str]
    weights: AdapterWeights
    users: int = 0       # requests holding it


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise InvalidRequestError("name", f"{quoted(name)} is not an adapter name: 1 to 64 characters, letters, "
                                          "digits and . _ : / + -, starting with a letter or digit")


class LoraRegistry:
    def __init__(self, cfg: ModelConfig, config: LoraConfig, device: torch.device, dtype: torch.dtype,
                 stacked: bool) -> None:
        """stacked: keep a LoraStack of every adapter (the Triton placement's kernels read it)."""
        self.cfg, self.config = cfg, config
        self.device, self.dtype, self.stacked = device, dtype, stacked
        self._by_name: dict[str, LoadedAdapter] = {}
        self.stack: LoraStack | None = None

    def read(self, path: str | Path) -> LoraAdapter:
        """The adapter at `path`, checked against the base model (no state changes: any thread)."""
        return load_adapter(path, self.cfg, self.config.max_rank)

    def add(self, name: str, adapter: LoraAdapter) -> LoadedAdapter:
        check_name(name)
        if name in self._by_name:
            raise AdapterExistsError(f"adapter {quoted(name)} is already loaded; unload it first or pick another name")
        if len(self._by_name) >= self.config.max_loras:
            raise FailedPreconditionError(f"{len(self._by_name)} adapters are loaded, this server's most "
                                          f"(--max-loras {self.config.max_loras}); unload one first")
        weights = AdapterWeights(name, next(_UIDS), adapter.rank,
                                 group_weights(adapter, self.cfg, self.device, self.dtype))
        if not self.stacked and self.device.type == "cpu" and self.dtype == torch.float32 and native.available():
            weights.native = native_layers(adapter, self.cfg)
        loaded = LoadedAdapter(name, adapter.path, adapter.format, adapter.rank, adapter.alpha, adapter.targets,
                               weights)
        self._by_name[name] = loaded
        self._restack()
        return loaded

    def remove(self, name: str) -> LoadedAdapter:
        loaded = self.get(name)
        if loaded.users:
            raise FailedPreconditionError(f"adapter {quoted(name)} is in use by {loaded.users} request(s); "
                                          "unload it once they have finished")
        del self._by_name[name]
        self._restack()
        return loaded

    def get(self, name: str) -> LoadedAdapter:
        loaded = self._by_name.get(name)
        if loaded is None:
            have = ", ".join(sorted(self._by_name)) or "none"
            raise AdapterNotFoundError(f"adapter {quoted(name)} is not loaded (loaded: {have}); load it with "
                                       "LoadAdapter or --lora NAME=PATH")
        return loaded

    def acquire(self, name: str) -> LoadedAdapter:
        loaded = self.get(name)
        loaded.users += 1
        return loaded

    @staticmethod
    def release(loaded: LoadedAdapter) -> None:
        assert loaded.users > 0, f"adapter {loaded.name!r} released more often than acquired"
        loaded.users -= 1

    def adapters(self) -> list[LoadedAdapter]:
        return list(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def _restack(self) -> None:
        adapters = list(self._by_name.values())
        for slot, loaded in enumerate(adapters):
            loaded.weights.slot = slot
        if self.stacked:
            self.stack = LoraStack.of([a.weights for a in adapters], self.cfg.n_layers) if adapters else None
