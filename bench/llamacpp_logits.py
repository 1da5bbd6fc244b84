"""llama.cpp's own logits against the float64 references of ../shared/data: its error, which Lumen's
matmul modes must not exceed (tests/engine/model/test_smollm2_reference.py,
tests/engine/weights/test_gguf_loader.py).

    .venv/bin/python bench/llamacpp_logits.py [--threads 2]

Needs llama-cpp-python (`pip install llama-cpp-python`; a test and benchmark oracle only). For each
SmolLM2-135M-Instruct prompt with references (capital, story): every prompt position's logits,
and max |llama.cpp - ref64| / max |ref64|, the rms relative error and the argmax agreement.
(The files of ../shared/data/quant carry llama.cpp's logits beside them; their README has the table.)
"""
from __future__ import annotations

import argparse

import numpy as np
from common import SHARED  # noqa: E402  (sets sys.path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import llama_cpp
    models = SHARED / "models"
    llm = llama_cpp.Llama(str(models / "SmolLM2-135M-Instruct.Q4_1.gguf"), n_ctx=512, logits_all=True,
                          n_threads=args.threads, verbose=False)
    print(f"llama-cpp-python {llama_cpp.__version__}, {args.threads} threads")
    print("| prompt | positions | max rel. error vs ref64 | rms rel. | argmax agree |")
    print("|---|---|---|---|---|")
    for name in ("capital", "story"):
        ids = [int(t) for t in (models / f"SmolLM2-135M-Instruct.{name}.prompt.ids").read_text().split()]
        ref = np.load(models / f"SmolLM2-135M-Instruct.{name}.ref64.logits.npy")
        llm.reset()
        llm.eval(ids)
        ours = np.array(llm.scores[:len(ids)], dtype=np.float64)
        err = np.abs(ours - ref).max() / np.abs(ref).max()
        rms = np.sqrt(((ours - ref) ** 2).mean() / (ref ** 2).mean())
        print(f"| {name} | {len(ids)} | {err:.2e} | {rms:.2e} | {(ours.argmax(-1) == ref.argmax(-1)).mean():.2f} |")


if __name__ == "__main__":
    main()
