"""Resolve and load the models a server is asked to serve, with a progress bar."""
from __future__ import annotations

import contextlib
import sys
import threading
from pathlib import Path
from typing import Callable, TypeVar

import torch
from tqdm import tqdm

from lumen.engine.demo.demo_model import ensure_demo_model
from lumen.engine.model.linear import plain_weights
from lumen.engine.weights.loaded_model import LoadedModel
from lumen.engine.weights.model_files import load_model

T = TypeVar("T")


def load_models(specs: list[tuple[str | None, Path]], dtype: torch.dtype,
                plain: bool = False) -> list[LoadedModel]:
    """Load each (name, path), a GGUF file or a Hugging Face directory; with no spec, write (once)
    and load the embedded demo model. plain: for a device placement (no CPU-only prepacking)."""
    if not specs:
        path = ensure_demo_model()
        print(f"lumen: no --model given; serving the embedded demo model {path} "
              "(random weights: its text is not meaningful)", file=sys.stderr)
        specs = [("lumen-demo", path)]
    return [load_with_progress(path, dtype, name, plain) for name, path in specs]


def load_with_progress(path: Path, dtype: torch.dtype, name: str | None = None, plain: bool = False) -> LoadedModel:
    """One model (a served model or a speculative draft), with its own progress bar."""
    with tqdm(desc=f"loading {path.name}", unit="layer", file=sys.stderr, leave=False) as bar, \
            (plain_weights() if plain else contextlib.nullcontext()):
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
        return load_model(path, dtype=dtype, name=name, progress=progress)


def in_passing_thread(fn: Callable[..., T], *args) -> T:
    """fn(*args) on a thread that ends when it returns; its result, or its exception re-raised.

    Loading a model and building its engine run torch and C kernels whose OpenMP regions give
    the calling thread a pool of worker threads for life. If that thread is the server's main
    thread, its idle pool stays next to each engine thread's own, libgomp then counts more
    threads than CPUs and stops spinning between regions, and every parallel region of a decode
    step waits on a futex: SmolLM2 decoded 2.4x slower in the engine thread (33 against 80 tok/s
    on 2 cores). A thread that ends takes its pool with it."""
    box: list = []

    def run() -> None:
        try:
            box.append((True, fn(*args)))
        except BaseException as exc:  # re-raised in the caller
            box.append((False, exc))

    thread = threading.Thread(target=run, name="lumen-load")
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value
