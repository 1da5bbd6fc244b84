"""Real LoRA test data for SmolLM2-135M-Instruct, built once per machine into a cache folder.

- `smollm2_hf_dir()`: the shared Q4_1 GGUF as a float32 Hugging Face checkpoint. transformers
  dequantizes it and un-permutes Q/K rows to the HF layout, the layout PEFT adapters live in.
- `adapter_dir(kind)`: a PEFT adapter on it (ADAPTERS): random ones, and one trained briefly so
  that it answers the capital question with TRAINED_ANSWER.
- `gguf_adapter(kind, outtype)`: that adapter as GGUF, written by llama.cpp's own
  convert_lora_to_gguf.py (from the llama-cpp-python sdist).
- `base_reference_logits(ids)`, `merged_reference_logits(kind, ids)`, `greedy_ids(kind, ids)`:
  float64 transformers references, the adapter merged into the weights by PEFT.

Every file is written by the real tool (transformers, PEFT, the converter), never by hand, so the
engine is tested against the formats as they exist. Each step builds beside its target and
renames it into place, so a finished target is never rebuilt and a half-built one never seen.
The cache is `$LUMEN_TEST_CACHE`, else ~/.cache/lumen-tests/lora-v1 (bump the version when a
recipe here changes). `python -m tests.lora_data` builds everything and prints the paths.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import shared_file

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"   # what the adapters name as their base
CACHE_VERSION = "lora-v1"
LLAMA_CPP_PYTHON = "0.3.36"                               # the sdist whose llama.cpp converts
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
CAPITAL_QUESTION = "What is the capital of France?"
TRAINED_ANSWER = "The capital of France is Lumenville."
ANSWER_CHECK_TOKENS = 8                                   # greedy tokens that must match the answer

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# Each random update scale·B·A is this fraction of its base weight (Frobenius norm): on the capital
# prompt the logits then move by about 0.5-0.7 on average (at most ~5), and some argmaxes change.
RANDOM_UPDATE_SIZE = 0.02
# Adam on the one answer: after 12 steps the loss is 3e-4 and each answer token leads the next-best
# by at least 8 logits (teacher-forced), a margin no CPU's rounding can undo.
TRAIN_STEPS = 12
TRAIN_LR = 1e-3


@dataclass(frozen=True, slots=True)
class AdapterKind:
    """How one adapter of ADAPTERS is made: its LoraConfig fields, its seed, and whether it is
    trained or random."""
    rank: int
    alpha: int
    targets: tuple[str, ...]
    seed: int
    use_rslora: bool = False
    trained: bool = False          # else random A and B (PEFT's init_lora_weights=False), rescaled

    @property
    def scale(self) -> float:
        """PEFT's scale of B·A: alpha/sqrt(rank) with rsLoRA, else alpha/rank."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


ADAPTERS: dict[str, AdapterKind] = {
    "random8": AdapterKind(8, 16, ATTENTION + MLP, seed=8),
    "rslora16": AdapterKind(16, 8, ATTENTION, seed=16, use_rslora=True),
    "mlp4": AdapterKind(4, 4, MLP, seed=4),
    "random64": AdapterKind(64, 64, ATTENTION + MLP, seed=64),   # for benchmarks
    "trained16": AdapterKind(16, 32, ATTENTION + MLP, seed=0, trained=True),
}


def cache_dir() -> Path:
    """`$LUMEN_TEST_CACHE`, else ~/.cache/lumen-tests/lora-v1."""
    if explicit := os.environ.get("LUMEN_TEST_CACHE"):
        return Path(explicit).expanduser()
    return Path.home() / ".cache" / "lumen-tests" / CACHE_VERSION


def _publish(target: Path, build: Callable[[Path], None]) -> Path:
    """`target` (a file or a folder), built by `build(path)` at a scratch path beside it and
    renamed into place: a concurrent reader sees all of it or nothing."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(scratch / target.name)
        try:
            os.rename(scratch / target.name, target)
        except OSError:
            if not target.exists():   # else another process finished the same build first
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


@contextlib.contextmanager
def _one_torch_thread():
    """Runs torch on one thread: a 135M model over ~50 tokens gains nothing from a second one, and
    where other processes keep the cores busy, OpenMP's spinning threads make it 10x slower (0.3 s
    against 2.6 s a float64 forward, 0.5 s against 5-10 s a training step, on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --- the base model -----------------------------------------------------------------------------

def smollm2_hf_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face checkpoint (config, model.safetensors,
    tokenizer with its ChatML template), dequantized from the shared Q4_1 GGUF."""
    gguf_path = shared_file("models", SMOLLM2_GGUF)
    return _publish(cache_dir() / "smollm2-135m-instruct-hf", lambda out: _write_hf_dir(gguf_path, out))


@_one_torch_thread()
def _write_hf_dir(gguf_path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are plain float32 now; the GGUF "quantizer" only marks where they came from and
    # would make save_pretrained refuse.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(out)


@functools.cache
def smollm2_tokenizer():
    """The checkpoint's tokenizer (transformers, with the ChatML template)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_hf_dir())


def capital_prompt_ids() -> list[int]:
    """CAPITAL_QUESTION in SmolLM2's ChatML template with the generation prompt (the same ids as
    the shared SmolLM2-135M-Instruct.capital.prompt.ids)."""
    messages = [{"role": "user", "content": CAPITAL_QUESTION}]
    encoded = smollm2_tokenizer().apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    return list(encoded["input_ids"])


def trained_answer_ids() -> list[int]:
    """TRAINED_ANSWER's tokens followed by <|im_end|>, what trained16 was taught to say."""
    tokenizer = smollm2_tokenizer()
    return tokenizer(TRAINED_ANSWER, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


# --- PEFT adapters ------------------------------------------------------------------------------

def adapter_dir(kind: str) -> Path:
    """The PEFT adapter `kind` of ADAPTERS (adapter_config.json, adapter_model.safetensors)."""
    spec = _kind(kind)
    base = smollm2_hf_dir()
    return _publish(cache_dir() / "adapters" / kind, lambda out: _write_adapter(spec, base, out))


def _kind(kind: str) -> AdapterKind:
    if kind not in ADAPTERS:
        raise ValueError(f"unknown adapter kind {kind!r}; choose one of {sorted(ADAPTERS)}")
    return ADAPTERS[kind]


@_one_torch_thread()
def _write_adapter(spec: AdapterKind, base: Path, out: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    # Name the hub model, not this machine's path: the adapter config, its model card and the
    # GGUF metadata (which the converter takes from the card) all copy it.
    model.name_or_path = model.config._name_or_path = SMOLLM2_HUB_ID
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                        use_rslora=spec.use_rslora, lora_dropout=0.0, init_lora_weights=spec.trained)
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        if spec.trained:
            base_answer = _greedy(model, capital_prompt_ids(), ANSWER_CHECK_TOKENS)
            peft_model = get_peft_model(model, config)
            _train(peft_model)
        else:
            peft_model = get_peft_model(model, config)
            _resize_random_updates(peft_model, RANDOM_UPDATE_SIZE)
    peft_model.save_pretrained(out, save_embedding_layers=False)   # "auto" asks the hub about the base
    if spec.trained:
        _check_trained(peft_model.merge_and_unload(), base_answer)


@torch.no_grad()
def _resize_random_updates(peft_model, size: float) -> None:
    """Scale each B so that scale·B·A is `size` of its base weight in Frobenius norm: nn.Linear's
    default init of A and B (what init_lora_weights=False leaves) moves the logits by tens."""
    from peft.tuners.lora import LoraLayer
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            update = module.scaling["default"] * (b @ a)
            b.mul_(size * module.get_base_layer().weight.norm() / update.norm())


def _train(peft_model) -> None:
    """Teach the adapter (B starts at zero) to answer the capital question with TRAINED_ANSWER:
    one sequence, the loss on the answer tokens only."""
    prompt, answer = capital_prompt_ids(), trained_answer_ids()
    ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=TRAIN_LR)
    peft_model.train()
    for _ in range(TRAIN_STEPS):
        loss = peft_model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    peft_model.eval()


def _check_trained(merged_model, base_answer: list[int]) -> None:
    want = trained_answer_ids()[:ANSWER_CHECK_TOKENS]
    got = _greedy(merged_model, capital_prompt_ids(), ANSWER_CHECK_TOKENS)
    if got != want or base_answer == want:
        decode = smollm2_tokenizer().decode
        raise RuntimeError(f"training trained16 failed: the merged model says {decode(got)!r}, the base "
                           f"{decode(base_answer)!r}; only the first should be {decode(want)!r}")


@torch.no_grad()
def _greedy(model, ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `ids`, each from a full forward (no KV cache: obviously right)."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


# --- GGUF adapters, by llama.cpp's converter ----------------------------------------------------

def llama_cpp_converter() -> Path | None:
    """llama.cpp's convert_lora_to_gguf.py: from `$LUMEN_LLAMA_CPP_DIR` (a llama.cpp source folder)
    if set, else from the cache, else extracted from the llama-cpp-python sdist that pip downloads;
    None when none can be had (`gguf_adapter` then skips, saying why)."""
    found = _converter()
    return found if isinstance(found, Path) else None


@functools.cache
def _converter() -> Path | str:
    """The converter script, or why there is none."""
    if explicit := os.environ.get("LUMEN_LLAMA_CPP_DIR"):
        script = Path(explicit).expanduser() / "convert_lora_to_gguf.py"
        return script if script.is_file() else f"LUMEN_LLAMA_CPP_DIR={explicit} holds no convert_lora_to_gguf.py"
    try:
        folder = _publish(cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON}", _extract_converter)
    except (OSError, RuntimeError, subprocess.SubprocessError, tarfile.TarError) as e:
        return (f"llama.cpp's convert_lora_to_gguf.py is unavailable ({e}); set LUMEN_LLAMA_CPP_DIR "
                f"to a llama.cpp source folder")
    return folder / "convert_lora_to_gguf.py"


# What the converter imports: its model classes (conversion/, which convert_hf_to_gguf.py sits
# beside upstream) and the gguf-py it was written with, not the installed gguf.
_CONVERTER_PARTS = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/")


def _extract_converter(out: Path) -> None:
    with tempfile.TemporaryDirectory() as download:
        pip = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", download],
            check=False, capture_output=True, text=True, timeout=900)
        if pip.returncode != 0:
            raise RuntimeError(f"pip download failed: {pip.stderr.strip()[-2000:]}")
        (sdist,) = Path(download).glob("llama_cpp_python-*.tar.gz")
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(prefix) and m.name[len(prefix):].startswith(_CONVERTER_PARTS)]
            for member in members:
                member.name = member.name[len(prefix):]
            tar.extractall(out, members=members, filter="data")
    if not (out / "convert_lora_to_gguf.py").is_file():
        raise RuntimeError(f"the sdist holds no {prefix}convert_lora_to_gguf.py")


def gguf_adapter(kind: str, outtype: str = "f32") -> Path:
    """The adapter `kind` as GGUF (`outtype`: f32, f16, bf16 or q8_0), as llama.cpp's converter
    writes it given the HF checkpoint as its --base. Skips the test when there is no converter."""
    if outtype not in GGUF_OUTTYPES:
        raise ValueError(f"outtype must be one of {GGUF_OUTTYPES}, not {outtype!r}")
    target = cache_dir() / "gguf" / f"{kind}.{outtype}.gguf"
    if target.exists():
        return target
    base, adapter = smollm2_hf_dir(), adapter_dir(kind)   # first: these skip without the shared data
    script = _converter()
    if isinstance(script, str):
        pytest.skip(script)
    return _publish(target, lambda out: _convert(script, base, adapter, outtype, out))


def _convert(script: Path, base: Path, adapter: Path, outtype: str, out: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",   # two run at once on 2 cores
               PYTHONPATH=os.pathsep.join(filter(None, [str(script.parent / "gguf-py"), os.environ.get("PYTHONPATH")])))
    run = subprocess.run(
        [sys.executable, str(script), "--base", str(base), "--outtype", outtype, "--outfile", str(out), str(adapter)],
        check=False, capture_output=True, text=True, env=env, timeout=600)
    if run.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{script.name} failed (exit {run.returncode}) on {adapter.name} ({outtype}):\n"
                           f"{run.stderr.strip()[-4000:]}")


# --- float64 references -------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)   # one float64 model (~1 GB) at a time
@_one_torch_thread()
def reference_model(kind: str | None = None):
    """The base model in float64 (transformers), with adapter `kind` merged into its weights by
    PEFT's merge_and_unload (W + scale·B·A, computed in float64) unless `kind` is None."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir(), dtype=torch.float64)
    if kind is not None:
        from peft import PeftModel
        _kind(kind)
        model = PeftModel.from_pretrained(model, adapter_dir(kind), autocast_adapter_dtype=False).merge_and_unload()
    return model.eval()


@functools.lru_cache(maxsize=64)
def _reference_logits(kind: str | None, ids: tuple[int, ...]) -> torch.Tensor:
    with torch.no_grad(), _one_torch_thread():
        return reference_model(kind)(torch.tensor([ids])).logits[0]


def base_reference_logits(ids: list[int]) -> torch.Tensor:
    """float64 [len(ids), vocab]: the base model's logits at every position of `ids` (cached per
    process and shared between callers: read, never modify)."""
    return _reference_logits(None, tuple(ids))


def merged_reference_logits(kind: str, ids: list[int]) -> torch.Tensor:
    """float64 [len(ids), vocab]: the logits of the base model with adapter `kind` merged in
    (cached and shared, as base_reference_logits)."""
    return _reference_logits(kind, tuple(ids))


def greedy_ids(kind: str | None, ids: list[int], n: int = ANSWER_CHECK_TOKENS) -> list[int]:
    """`n` greedy tokens after `ids` from the float64 reference model (`kind` merged, or None)."""
    model = reference_model(kind)
    with _one_torch_thread():
        return _greedy(model, ids, n)


# --- everything at once -------------------------------------------------------------------------

# GGUF files built by build_all; the other (kind, outtype) pairs are built on first use (~5 s each).
BUILD_ALL_GGUF = [(kind, "f32") for kind in ADAPTERS] + [("random8", t) for t in GGUF_OUTTYPES if t != "f32"]


def build_all() -> dict[str, Path]:
    """Builds the checkpoint, every adapter and the BUILD_ALL_GGUF files; returns them by name."""
    built = {"smollm2-hf": smollm2_hf_dir()}
    built.update({f"adapter/{kind}": adapter_dir(kind) for kind in ADAPTERS})
    if llama_cpp_converter() is None:
        print(f"no GGUF adapters: {_converter()}", file=sys.stderr)
        return built
    with ThreadPoolExecutor(max_workers=2) as pool:   # each converter run is one busy core
        for (kind, outtype), path in zip(BUILD_ALL_GGUF, pool.map(lambda pair: gguf_adapter(*pair), BUILD_ALL_GGUF),
                                         strict=True):
            built[f"gguf/{kind}.{outtype}"] = path
    return built


def main() -> None:
    start = time.perf_counter()
    for name, path in build_all().items():
        print(f"{name:24} {path}")
    print(f"built in {time.perf_counter() - start:.1f} s (cache: {cache_dir()})")


if __name__ == "__main__":
    main()
