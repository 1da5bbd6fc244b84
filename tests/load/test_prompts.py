"""Prompt files: one prompt per line, or JSONL with per-request max_new_tokens; clear errors."""
from __future__ import annotations

import pytest

from lumen.load.prompts import BUILTIN_PROMPTS, PromptSpec, load_prompts


def test_plain_lines_skip_blanks(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Once upon a time\n\n  \nThe cat sat\n")
    assert load_prompts(path) == [PromptSpec("Once upon a time"), PromptSpec("The cat sat")]


def test_jsonl_with_max_new_tokens(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a", "max_new_tokens": 8}\n\n{"prompt": "b"}\n')
    assert load_prompts(path) == [PromptSpec("a", 8), PromptSpec("b")]


@pytest.mark.parametrize("line,message", [
    ("not json", "not valid JSON"),
    ('{"text": "a"}', 'string "prompt"'),
    ('{"prompt": "a", "max_new_tokens": "8"}', "must be an integer"),
    ('{"prompt": "a", "max_new_tokens": 0}', "must be >= 1"),
])
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        load_prompts(path)
    assert f"{path}:2" in str(err.value)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(path)


def test_builtin_prompts_are_varied():
    assert len({p.prompt for p in BUILTIN_PROMPTS}) == len(BUILTIN_PROMPTS) >= 6
