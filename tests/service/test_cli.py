"""The `lumen` command line: speculative decoding flags, and clear startup errors for bad combinations."""
from __future__ import annotations

import asyncio

import pytest

from lumen.engine.core.async_engine import DEFAULT_STREAM_BUFFER_TOKENS
from lumen.engine.demo.synthetic import SyntheticShape, VocabMetadata, write_synthetic_llama
from lumen.engine.speculative import SpecMethod
from lumen.engine.speculative.config import MAX_SPECULATIVE_TOKENS
from lumen.service import cli, server
from lumen.service.cli import main
from lumen.service.limits import RequestLimits

TINY = SyntheticShape(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, context_length=128)


def other_vocab(size: int) -> VocabMetadata:
    """A SentencePiece-style vocabulary whose ids mean other tokens than stories260K's."""
    return VocabMetadata(model="llama", tokens=tuple(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(size - 3)]),
                         scores=tuple(float(-i) for i in range(size)), token_types=(2, 3, 3) + (1,) * (size - 3),
                         bos_id=1, eos_id=2, unk_id=0, add_bos=True, add_eos=False)


def test_cli_knows_the_engines_methods_and_limit():
    assert cli.SPEC_METHODS == tuple(m.value for m in SpecMethod)
    assert cli.MAX_SPECULATIVE_TOKENS == MAX_SPECULATIVE_TOKENS


def test_cli_limit_defaults_are_the_servers():
    args = cli.build_parser().parse_args(["serve"])
    assert cli.DEFAULT_STREAM_BUFFER_TOKENS == DEFAULT_STREAM_BUFFER_TOKENS == args.stream_buffer_tokens
    assert cli._limits(args) == RequestLimits()


def test_a_limit_that_cannot_work_is_a_one_line_error(capsys, server_never_starts):
    assert main(["serve", "--max-prompt-bytes", "0"]) == 1
    assert "max_prompt_bytes must be >= 1" in one_line_error(capsys)


def test_a_used_port_is_a_one_line_error(capsys, stories_path):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(stories_path), "--port", str(port), "--log-level", "ERROR"]) == 1
    assert "in use" in one_line_error(capsys)


@pytest.fixture
def server_never_starts(monkeypatch):
    """A serve command that got past its checks fails here instead of serving forever."""
    async def refuse(self, host, port):
        raise AssertionError("lumen serve should have refused its options before listening")
    monkeypatch.setattr(server.LumenServer, "start", refuse)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("lumen: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_speculative_draft_needs_a_draft_model(stories_path, capsys, server_never_starts):
    assert main(["serve", "--model", str(stories_path), "--speculative", "draft"]) == 1
    assert "--draft-model" in one_line_error(capsys)


@pytest.mark.parametrize("vocab_size", [64, 512], ids=["smaller vocabulary", "same size, other tokens"])
def test_draft_with_another_vocabulary_is_refused(stories_path, tmp_path, capsys, server_never_starts, vocab_size):
    draft = write_synthetic_llama(tmp_path / "draft.gguf", TINY, other_vocab(vocab_size), seed=5, name="draft")
    argv = ["serve", "--model", str(stories_path), "--draft-model", str(draft), "--speculative", "draft",
            "--port", "0", "--kv-cache-memory", "16MiB"]
    assert main(argv) == 1
    line = one_line_error(capsys)
    assert "vocabulary" in line and str(draft) in line


def test_serve_passes_speculative_flags_to_the_engine(stories_path, monkeypatch):
    seen = {}

    async def fake_run_server(config, telemetry, loaded, draft=None):
        seen.update(config=config, loaded=loaded, draft=draft)

    monkeypatch.setattr(server, "run_server", fake_run_server)
    argv = ["serve", "--model", str(stories_path), "--draft-model", str(stories_path), "--speculative", "layer_skip",
            "--num-speculative-tokens", "6", "--layer-skip-layers", "2", "--speculative-max-batch", "8",
            "--adaptive-speculative-tokens"]
    assert main(argv) == 0
    spec = seen["config"].engine.speculative
    assert (spec.method, spec.num_tokens, spec.layer_skip_layers, spec.max_batch, spec.adaptive) == (
        SpecMethod.LAYER_SKIP, 6, 2, 8, True)
    assert seen["draft"].path == stories_path and seen["loaded"][0].path == stories_path


@pytest.mark.parametrize("flag,value", [("--num-speculative-tokens", "17"), ("--num-speculative-tokens", "0"),
                                        ("--speculative", "bogus"), ("--speculative-max-batch", "-1"),
                                        ("--gpu-memory-utilization", "2"), ("--device", "tpu")])
def test_bad_speculative_flag_is_a_usage_error(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", flag, value])
    assert exit_.value.code == 2 and flag in capsys.readouterr().err


async def test_generate_prints_draft_tokens_in_its_summary(stories, capsys):
    argv = ["generate", "", "--server", stories.target, "--max-tokens", "200", "--temperature", "0",
            "--ignore-eos", "--speculative", "ngram", "--num-speculative-tokens", "4"]
    assert await asyncio.to_thread(main, argv) == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert "completion_tokens=200 draft_tokens=" in summary and "accepted=" in summary
    argv = ["generate", "", "--server", stories.target, "--max-tokens", "5"]
    assert await asyncio.to_thread(main, argv) == 0
    assert "draft_tokens" not in capsys.readouterr().err


def test_serve_logs_the_kernel_build_it_runs(monkeypatch, caplog):
    from lumen.engine.native import library
    monkeypatch.setenv("LUMEN_NATIVE_VARIANT", "x86-64-v3")
    monkeypatch.setattr(library, "cpu_level", lambda: 3)
    library.library.cache_clear()
    monkeypatch.setattr(server, "_LOGGED", set())
    try:
        with caplog.at_level("INFO", logger="lumen.service.server"):
            server.check_kernels(allow_slow=False)
            server.check_kernels(allow_slow=False)       # logged once per process
    finally:
        library.library.cache_clear()
    (record,) = [r for r in caplog.records if r.name == "lumen.service.server"]
    assert record.levelname == "INFO" and "x86-64-v3 build" in record.getMessage()
    assert "AVX2 vector paths" in record.getMessage()


@pytest.mark.parametrize("variant,takes", [
    ("x86-64-v3", "int8 for every type with integer kernels (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)"),
    ("x86-64-v4", "int8 for Q4_0, Q4_1; exact for Q8_0, Q4_K, Q5_K, Q6_K and the other types"),
    ("x86-64-v2", "exact for every type")])
def test_auto_matmul_mode_is_logged_with_what_it_takes_per_type(monkeypatch, caplog, variant, takes):
    """--matmul-mode auto (the default) stays auto: the engines take int8 or exact per weight type
    (kernels.auto_int8, BENCHMARKS.md), and the log says which on this build, once. An explicit
    mode is kept as given."""
    from lumen.engine.native import build, library
    if not any(v.name == variant for v in library.runnable()) or not build.installed_path(
            build.variant(variant).module).exists():
        pytest.skip(f"this CPU does not run the {variant} build")
    monkeypatch.setenv("LUMEN_NATIVE_VARIANT", variant)
    library.library.cache_clear()
    monkeypatch.setattr(server, "_LOGGED", set())
    try:
        with caplog.at_level("INFO", logger="lumen.service.server"):
            assert server.resolve_matmul_mode("auto") == "auto"
            assert server.resolve_matmul_mode("auto") == "auto"
            assert server.resolve_matmul_mode("exact") == "exact"
    finally:
        library.library.cache_clear()
    lines = [r.getMessage() for r in caplog.records if r.name == "lumen.service.server"]
    assert lines == [f"matmul mode: auto ({takes}: the faster per weight type on this kernel build, as measured)",
                     "matmul mode: exact"]


def test_an_unknown_matmul_mode_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--matmul-mode", "int4"])
    assert exit_.value.code == 2 and "--matmul-mode" in capsys.readouterr().err


@pytest.mark.parametrize("why", ["scalar build", "no kernels"])
def test_serve_without_a_vector_path_needs_an_explicit_flag(monkeypatch, caplog, capsys, why, server_never_starts):
    """No silent fallback to a path 10x slower: refused, unless --allow-slow-kernels (then a warning)."""
    from lumen.engine.native import library
    if why == "scalar build":
        monkeypatch.setattr(library, "vector_isa", lambda: None)
        monkeypatch.setattr(library, "describe", lambda: "C kernels: the x86-64-v2 build, no vector path")
    else:
        def missing():
            raise library.NativeUnavailable("the C kernels are not built")
        monkeypatch.setattr(library, "describe", missing)
    assert main(["serve", "--log-level", "ERROR"]) == 1
    error = one_line_error(capsys)
    assert "--allow-slow-kernels" in error and ("no vector path" in error or "not built" in error)
    monkeypatch.setattr(server, "_LOGGED", set())
    with caplog.at_level("WARNING", logger="lumen.service.server"):
        server.check_kernels(allow_slow=True)
    assert caplog.records[-1].levelname == "WARNING"


@pytest.mark.parametrize("argv,message", [
    (["--device", "cuda"], "torch sees no CUDA GPU here"),
    (["--device", "cpu", "--kernels", "triton"], "needs TRITON_INTERPRET=1"),
    (["--dtype", "float16"], "compute in float32 or bfloat16"),
])
def test_a_placement_that_cannot_work_is_a_one_line_error(argv, message, capsys, monkeypatch, server_never_starts):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda works here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["serve", *argv]) == 1
    assert message in one_line_error(capsys)


def test_serve_passes_the_placement_to_the_engines(stories_path, monkeypatch):
    seen = {}

    async def fake_run_server(config, telemetry, loaded, draft=None):
        seen.update(config=config, loaded=loaded)

    monkeypatch.setattr(server, "run_server", fake_run_server)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    argv = ["serve", "--model", str(stories_path), "--device", "cpu", "--kernels", "triton", "--enforce-eager",
            "--gpu-memory-utilization", "0.5"]
    assert main(argv) == 0
    engine = seen["config"].engine
    assert (engine.placement.device.type, engine.placement.kernels, engine.enforce_eager,
            engine.gpu_memory_utilization) == ("cpu", "triton", True, 0.5)
    assert main(["serve", "--model", str(stories_path)]) == 0
    assert seen["config"].engine.placement.kernels == "native"   # auto on a CPU
