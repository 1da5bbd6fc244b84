"""`lumen chat`: a one-shot question, and a conversation read line by line with its history
kept client-side (each turn resends it), against a real server on SmolLM2."""
from __future__ import annotations

import asyncio
import io

import pytest_asyncio

from lumen.service import chat_cli
from lumen.service.cli import main
from tests.service.conftest import start_harness


@pytest_asyncio.fixture
async def smol(smollm2_model):
    harness = await start_harness(smollm2_model)
    yield harness
    await harness.close()


async def test_one_question(smol, capsys):
    argv = ["chat", "What is the capital of France?", "--server", smol.target, "--temperature", "0"]
    assert await asyncio.to_thread(main, argv) == 0
    out = capsys.readouterr()
    assert out.out == "The capital of France is Paris.\n"
    assert "finish=eos" in out.err


async def test_a_conversation_keeps_its_history(smol, capsys, monkeypatch):
    sent: list[list[tuple[str, str]]] = []
    real = chat_cli._request

    def record(args, history, template):
        sent.append(list(history))
        return real(args, history, template)

    monkeypatch.setattr(chat_cli, "_request", record)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n\nAnd of Italy?\n/reset\nHi\n"))
    argv = ["chat", "--server", smol.target, "--temperature", "0", "--max-tokens", "12", "--system", "Be brief."]
    assert await asyncio.to_thread(main, argv) == 0
    first_answer = capsys.readouterr().out.splitlines()[0]
    assert "Paris" in first_answer
    assert sent[0] == [("system", "Be brief."), ("user", "What is the capital of France?")]
    assert sent[1][:3] == [*sent[0], ("assistant", first_answer)] and sent[1][3] == ("user", "And of Italy?")
    assert sent[2] == [("system", "Be brief."), ("user", "Hi")]          # /reset dropped the history


async def test_a_failed_turn_is_reported_and_the_session_goes_on(smol, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nWhat is the capital of France?\n"))
    argv = ["chat", "--server", smol.target, "--temperature", "0", "--stop-token-id", "99999999"]
    assert await asyncio.to_thread(main, argv) == 0
    err = capsys.readouterr().err
    assert err.count("INVALID_ARGUMENT") == 2 and "stopping.stop_token_ids" in err


async def test_a_chat_template_file(smol, capsys, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                        "<|im_start|>assistant\n")
    argv = ["chat", "What is the capital of France?", "--server", smol.target, "--temperature", "0",
            "--chat-template", str(template), "--max-tokens", "3"]
    assert await asyncio.to_thread(main, argv) == 0
    assert "prompt_tokens=15 " in capsys.readouterr().err   # no default system turn: the file's template
