"""The prompts a load run sends: a built-in set, or a file (plain lines or JSONL).

Requests take prompts round-robin (request i gets prompt i % n), so a run is
reproducible from its config alone. This module only reads and checks prompts;
it never talks to a server.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(slots=True, frozen=True)
class PromptSpec:
    """One prompt, with an optional max_new_tokens that overrides the run's."""

    prompt: str
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


# Children's-story openings: the stories260K model was trained on such text, and
# the demo model accepts anything. Lengths vary so prefill cost varies too.
BUILTIN_PROMPTS: tuple[PromptSpec, ...] = tuple(PromptSpec(p) for p in (
    "Once upon a time",
    "One day, a little girl named Lily found a shiny red ball in the park.",
    "Tom and his dog Max went to the beach. The sun was hot and the sand was soft.",
    "There was a big tree in the garden. Every morning, a small bird sang on its branch.",
    "Sara wanted to bake a cake for her mom. She got flour, eggs and sugar from the kitchen, "
    "but she could not find the milk.",
    "Ben had a toy car that could go very fast. One day the car rolled under the bed, and Ben "
    "looked for it everywhere. He asked his sister Mia to help him.",
    "Once upon a time, there was a kind old bear who lived in a cave near the river. The bear "
    "liked honey more than anything else. One morning, he woke up and saw that his honey pot "
    "was empty. He was sad, so he went out to look for bees. On the way he met a little rabbit.",
    "The cat sat on the mat and looked at the rain.",
))


def _jsonl_prompt(line: str, where: str) -> PromptSpec:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        raise ValueError(f'{where}: expected an object with a string "prompt"')
    max_new = obj.get("max_new_tokens")
    if max_new is not None and (not isinstance(max_new, int) or isinstance(max_new, bool)):
        raise ValueError(f"{where}: max_new_tokens must be an integer, got {max_new!r}")
    try:
        return PromptSpec(obj["prompt"], max_new)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def load_prompts(path: str | Path) -> list[PromptSpec]:
    """Prompts from a file: JSONL when the name ends in .jsonl, else one prompt per line.

    Blank lines are skipped in both formats. JSONL objects carry `prompt` and
    optionally `max_new_tokens`.
    """
    path = Path(path)
    jsonl = path.suffix.lower() == ".jsonl"
    prompts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        prompts.append(_jsonl_prompt(line, f"{path}:{lineno}") if jsonl else PromptSpec(line))
    if not prompts:
        raise ValueError(f"{path}: no prompts (the file is empty or has only blank lines)")
    return prompts
