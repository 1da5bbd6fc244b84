"""llama.cpp loading the same GGUF LoRA adapters as Lumen: both against the float64 reference (the
base model with the PEFT adapter merged into its weights, run by transformers: tests/lora_data.py).

    .venv/bin/python bench/lora_llamacpp.py --llama-python PATH [--threads 2]

PATH: a Python with llama-cpp-python installed (a test and benchmark oracle only; it may be this
venv's own after `pip install llama-cpp-python`). For each adapter (GGUF files written by llama.cpp's
convert_lora_to_gguf.py) and the base model: every position's logits of SmolLM2's capital prompt,
max |x - ref64| / max |ref64| for Lumen (exact mode) and for llama.cpp (`lora_path`), and whether
their argmax agrees with the reference's.
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import SHARED  # noqa: E402  (sets sys.path)

from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
from lumen.engine.weights.gguf_loader import load_gguf
from tests import lora_data
from tests.engine.lora.helpers import prompt_logits

MODEL = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
KINDS = ["random8", "mlp4", "trained16", "random64"]

LLAMA_SCRIPT = """
import sys, numpy as np, llama_cpp
model, lora, ids, out, threads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
ids = [int(t) for t in open(ids).read().split()]
llm = llama_cpp.Llama(model, n_ctx=512, logits_all=True, n_threads=threads, verbose=False,
                      **({"lora_path": lora} if lora != "-" else {}))
llm.eval(ids)
np.save(out, np.array(llm.scores[:len(ids)], dtype=np.float64))
print(llama_cpp.__version__)
"""


def llama_cpp_logits(python: str, lora: Path | None, ids: list[int], threads: int) -> tuple[np.ndarray, str]:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "ids").write_text(" ".join(map(str, ids)))
        out = Path(tmp) / "logits.npy"
        version = subprocess.run([python, "-c", LLAMA_SCRIPT, str(MODEL), str(lora) if lora else "-",
                                  str(Path(tmp) / "ids"), str(out), str(threads)], check=True, capture_output=True,
                                 text=True).stdout.strip()
        return np.load(out), version


def error(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(x - ref).max() / np.abs(ref).max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-python", required=True, help="a Python with llama-cpp-python installed")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    engine = LLMEngine(load_gguf(MODEL), EngineConfig(kv_cache_bytes=64 << 20))
    ids = lora_data.capital_prompt_ids()
    rows = []
    for kind in [None] + KINDS:
        path = lora_data.gguf_adapter(kind, "f32") if kind else None
        ref = (lora_data.merged_reference_logits(kind, ids) if kind else lora_data.base_reference_logits(ids)).numpy()
        if kind:
            engine.load_adapter(kind, engine.lora.read(path))
            ours = prompt_logits(engine, ids, (engine.lora.get(kind).weights, 1.0)).double().numpy()
            engine.unload_adapter(kind)
        else:
            ours = prompt_logits(engine, ids).double().numpy()
        theirs, version = llama_cpp_logits(args.llama_python, path, ids, args.threads)
        rows.append((kind or "(base)", error(ours, ref), error(theirs, ref), (ours.argmax(-1) == ref.argmax(-1)).mean(),
                     (theirs.argmax(-1) == ref.argmax(-1)).mean(), error(ours, theirs)))
    print(f"llama-cpp-python {version}, {args.threads} threads; SmolLM2 capital prompt, {len(ids)} positions")
    print("| adapter (GGUF f32) | Lumen vs ref64 | llama.cpp vs ref64 | Lumen argmax = ref | llama.cpp argmax = ref "
          "| Lumen vs llama.cpp |")
    print("|---|---|---|---|---|---|")
    for kind, ours, theirs, a_ours, a_theirs, between in rows:
        print(f"| {kind} | {ours:.2e} | {theirs:.2e} | {a_ours:.2f} | {a_theirs:.2f} | {between:.2e} |")


if __name__ == "__main__":
    main()
