"""What one chat-template render may spend, and where the template code finds it.

A `Budget` holds a render's three bounds: a wall-clock deadline, a size per value, and the
characters allocated in total (sandbox.py says how each is enforced). It lives in a ContextVar
set by `bounded()`, so one compiled template serves many threads, each render with its own.
Template code that runs outside `bounded()` is a bug: `current_budget()` raises then.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from jinja2.utils import Namespace

ALLOCATION_FACTOR = 16  # a render may allocate this many times max_chars characters in total
MAX_INT_BITS = 1 << 16  # big-integer arithmetic beyond this is slow in a single C call
TICK_EVERY = 1024  # our own Python loops over template values check the deadline this often


class TemplateLimitError(Exception):
    """A render ran past one of its bounds; the message says which and how to stay within it."""


class Budget:
    """What one render may still spend: a deadline, a size per value, characters in total."""

    __slots__ = ("_sizes", "allocated", "deadline", "max_chars", "seconds")

    def __init__(self, seconds: float, max_chars: int, deadline: float | None = None) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds if deadline is None else deadline
        self.max_chars = max_chars
        self.allocated = 0
        self._sizes: dict[int, tuple[Any, int]] = {}  # id -> (value kept alive, tree size)

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(
                f"rendering took longer than {self.seconds:g} s (max_render_seconds): "
                "the template loops too long for this conversation")

    def reserve(self, chars: int, what: str) -> None:
        """Refuse, before it runs, an operation whose result would be `chars` characters long."""
        if chars > self.max_chars:
            raise TemplateLimitError(
                f"{what} would be {chars} characters long; a template's values are limited to "
                f"{self.max_chars} characters (max_output_chars)")
        if self.allocated + chars > self.max_chars * ALLOCATION_FACTOR:
            self._over_allocation()

    def admit(self, value: Any, what: str = "a value the template built") -> Any:
        """`value`, once its size is checked and its new characters are counted."""
        self.tree_size(value, what)
        if isinstance(value, (str, list, tuple, dict)):
            self.allocated += len(value)
            if self.allocated > self.max_chars * ALLOCATION_FACTOR:
                self._over_allocation()
        return value

    def tree_size(self, value: Any, what: str = "a value the template built") -> int:
        """Characters `value` would print as, about, counting each reference to a shared part."""
        if isinstance(value, str):
            size = len(value)
        elif isinstance(value, int):
            if value.bit_length() > MAX_INT_BITS:
                raise TemplateLimitError(f"{what} is an integer of {value.bit_length()} bits; "
                                         f"the limit is {MAX_INT_BITS}")
            size = value.bit_length() // 3 + 1
        elif isinstance(value, (list, tuple, dict, Namespace)):
            size = self._container_size(value, what)
        else:
            return 8
        if size > self.max_chars:
            raise TemplateLimitError(
                f"{what} is larger than {self.max_chars} characters (max_output_chars)")
        return size

    def _container_size(self, value: Any, what: str) -> int:
        cached = self._sizes.get(id(value))
        if cached is not None:
            return cached[1]
        mutable = isinstance(value, Namespace)  # a namespace's attributes change: never cached
        contents = object.__getattribute__(value, "_Namespace__attrs") if mutable else value
        items = [*contents.keys(), *contents.values()] if isinstance(contents, dict) else contents
        total = 2 + 2 * len(items)
        for index, item in enumerate(items):
            if index % TICK_EVERY == TICK_EVERY - 1:
                self.tick()
            total += self.tree_size(item, what)
            if total > self.max_chars:
                break
        if not mutable:
            self._sizes[id(value)] = (value, total)
        return total

    def _over_allocation(self) -> None:
        raise TemplateLimitError(
            f"the template allocated more than {self.max_chars * ALLOCATION_FACTOR} characters "
            f"in total ({ALLOCATION_FACTOR} x max_output_chars)")


_BUDGET: ContextVar[Budget | None] = ContextVar("lumen_chat_template_budget", default=None)


def current_budget() -> Budget:
    budget = _BUDGET.get()
    if budget is None:
        raise RuntimeError("template code ran outside sandbox.bounded(); render through it")
    return budget


@contextmanager
def bounded(budget: Budget) -> Iterator[Budget]:
    """Run the template code of this block (compiling included) under `budget`."""
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)
