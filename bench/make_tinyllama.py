"""Write a TinyLlama-shaped random-weight GGUF model for the benchmark.

Shape of TinyLlama 1.1B (dim 2048, 22 layers, 32 heads / 4 KV heads, ffn 5632) with
the real Llama 2 32000-token vocabulary copied from a vocab-only GGUF file, so that
prompt token counts match a real model. Weights are random: the file measures speed,
never quality. The vocab file is only read, never copied into the repository.

    python bench/make_tinyllama.py --out /tmp/tinyllama-q8_0.gguf [--qtype Q8_0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gguf import GGMLQuantizationType

# Run as a script from anywhere: make the repository's packages importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lumen.engine.demo.synthetic import TINYLLAMA, VocabMetadata, write_synthetic_llama  # noqa: E402

# ../shared/data next to the repository root (read only, never copied in).
DEFAULT_VOCAB = (Path(__file__).resolve().parents[2] / "shared" / "data" / "vocab"
                 / "ggml-vocab-llama-spm.gguf")
QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="GGUF file to write")
    parser.add_argument("--qtype", choices=QTYPES, default="Q8_0",
                        help="storage type of the weight matrices (norms stay F32)")
    parser.add_argument("--vocab", type=Path, default=DEFAULT_VOCAB,
                        help="GGUF file whose tokenizer.* fields are copied (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.vocab.is_file():
        print(f"vocab file not found: {args.vocab}; pass --vocab PATH", file=sys.stderr)
        return 2
    vocab = VocabMetadata.from_gguf(args.vocab)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    path = write_synthetic_llama(args.out, TINYLLAMA, vocab,
                                 qtype=GGMLQuantizationType[args.qtype], seed=args.seed,
                                 name=f"tinyllama-shaped-synthetic-{args.qtype.lower()}")
    seconds = time.perf_counter() - start
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, vocab {vocab.vocab_size}) "
          f"in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
