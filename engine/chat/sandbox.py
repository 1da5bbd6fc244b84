"""A Jinja sandbox with bounds, for chat templates that clients and model files supply.

`BoundedEnvironment` is jinja2's `ImmutableSandboxedEnvironment` (no attribute starting with an
underscore, no method that mutates a list, dict or set) plus three bounds that never change what a
template renders, only stop one that runs away:

- time: a wall-clock deadline, checked at the start of every block the template runs (each loop
  iteration, each branch, each macro body) and in every call, filter and intercepted operator;
- size: no value may be larger than `Budget.max_chars` characters, counting shared parts each time
  they are referenced (so `str()`, `==`, `tojson` and sorting stay bounded). Operations that could
  build a huge value in one step (`*`, `**`, `%`, `+`, `~`, join, replace, center, indent, format,
  str.format, ...) are checked before they run; every result after;
- memory: the characters a render allocates in total are limited to ALLOCATION_FACTOR times
  `max_chars`, so a loop cannot fill memory with values that are each within the size limit.

The limits live in a per-render `Budget` (budget.py) held in a ContextVar, so one environment
serves many threads. This module knows nothing of chat templates; it must never run template code outside
`bounded()` (the hooks raise RuntimeError there) and never loosen jinja2's sandbox.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from functools import update_wrapper, wraps
from typing import Any

from jinja2 import nodes, pass_environment, pass_eval_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.filters import make_attrgetter
from jinja2.runtime import str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.utils import generate_lorem_ipsum
from markupsafe import Markup

from lumen.engine.chat.budget import MAX_INT_BITS, TICK_EVERY, Budget, TemplateLimitError, current_budget

_SEQUENCES = (str, list, tuple)
_PRINTF_NUMBERS = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


def _admitting(visit: Callable[[CodeGenerator, Any, Frame], None]) -> Callable[..., None]:
    """A literal's visitor that wraps the list, dict or tuple it builds in environment.admit()."""
    def visit_literal(self: CodeGenerator, node: Any, frame: Frame) -> None:
        if getattr(node, "ctx", "load") != "load":  # a tuple as an assignment target
            return visit(self, node, frame)
        self.write("environment.admit(")
        visit(self, node, frame)
        self.write(")")

    return visit_literal


class _BoundedCodeGenerator(CodeGenerator):
    """jinja2's code generator, with the hooks that no sandbox method offers."""

    def blockvisit(self, body: Iterable[nodes.Node], frame: Frame) -> None:
        # Every loop iteration, branch and macro body starts by checking the deadline.
        self.writeline("environment.tick()")
        super().blockvisit(body, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        else:
            join = "markup_join" if frame.eval_ctx.autoescape else "str_join"
        self.write(f"environment.join_values({join}, (")
        for operand in node.nodes:
            self.visit(operand, frame)
            self.write(", ")
        self.write("))")

    visit_List = _admitting(CodeGenerator.visit_List)
    visit_Dict = _admitting(CodeGenerator.visit_Dict)
    visit_Tuple = _admitting(CodeGenerator.visit_Tuple)


def _printf_size(fmt: str, values: Any, budget: Budget) -> int:
    """An upper bound on the length of `fmt % values`."""
    if isinstance(values, dict):
        values = list(values.values())
    elif not isinstance(values, tuple):
        values = [values]
    size = len(fmt) + sum(budget.tree_size(value) for value in values)
    for width, precision in _PRINTF_NUMBERS.findall(fmt):
        for number in (width, precision):
            if number == "*":
                size += sum(v for v in values if isinstance(v, int) and v > 0)
            elif number:
                size += int(number) if len(number) < 10 else budget.max_chars + 1
    return size


def _binop_estimate(op: str, left: Any, right: Any, budget: Budget) -> int:
    """An upper bound on the characters of `left op right` (ints: checked here, counted as 0)."""
    if isinstance(left, int) and isinstance(right, int):
        bits = {"*": left.bit_length() + right.bit_length(),
                "**": left.bit_length() * right if abs(left) > 1 and right > 0 else 0}.get(op, 0)
        if bits > MAX_INT_BITS:
            raise TemplateLimitError(f"`{op}` would build an integer of about {bits} bits; "
                                     f"the limit is {MAX_INT_BITS}")
        return 0
    if op == "*":
        seq, times = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(seq, _SEQUENCES) and isinstance(times, int):
            return len(seq) * max(times, 0)
    elif op == "+" and isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
        return len(left) + len(right)
    elif op == "%" and isinstance(left, str):
        return _printf_size(left, right, budget)
    return 0


class _FieldBudget:
    """A str.format formatter that reserves each field's width and value before formatting it."""

    budget: Budget

    def format_field(self, value: Any, format_spec: str) -> Any:
        numbers = _DIGITS.findall(format_spec)
        width = sum(int(n) if len(n) < 10 else self.budget.max_chars + 1 for n in numbers)
        self.budget.reserve(width + self.budget.tree_size(value), "a str.format() field")
        return super().format_field(value, format_spec)  # type: ignore[misc]


class _BoundedFormatter(_FieldBudget, SandboxedFormatter):
    pass


class _BoundedEscapeFormatter(_FieldBudget, SandboxedEscapeFormatter):
    pass


def _str_method_estimate(method: Any, args: tuple, kwargs: dict, budget: Budget) -> tuple | None:
    """For an amplifying str method, check it and return the args to call it with; else None."""
    owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if not isinstance(owner, str):
        return None
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        budget.reserve(max(len(owner), args[0]), f"str.{name}()")
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tab, int):
            budget.reserve(len(owner) + owner.count("\t") * max(tab, 0), "str.expandtabs()")
    elif name == "join" and args:
        items = list(args[0])
        chars = sum(budget.tree_size(item) for item in items) + len(owner) * max(len(items) - 1, 0)
        budget.reserve(chars, "str.join()")
        return (items, *args[1:])
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        budget.reserve(_replace_size(owner, args[0], args[1]), "str.replace()")
    elif name == "translate" and args and isinstance(args[0], dict):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        budget.reserve(len(owner) * max(longest, 1), "str.translate()")
    return args


def _replace_size(s: str, old: str, new: str) -> int:
    hits = s.count(old) if old else len(s) + 1
    return len(s) + hits * max(len(new) - len(old), 0)


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, with every bound of this module (see the module docstring)."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, *, extra_filters: dict[str, Callable] | None = None,
                 extra_globals: dict[str, Any] | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.filters.update(extra_filters or {})
        self.filters = {name: _bounded_filter(name, func) for name, func in self.filters.items()}
        self.globals["lipsum"] = _lipsum
        self.globals.update(extra_globals or {})

    def tick(self) -> None:
        current_budget().tick()

    def admit(self, value: Any) -> Any:
        return current_budget().admit(value)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = current_budget()
        budget.tick()
        budget.reserve(_binop_estimate(operator, left, right, budget), f"`{operator}`")
        return budget.admit(self.binop_table[operator](left, right), f"the result of `{operator}`")

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = current_budget()
        budget.tick()
        checked = _str_method_estimate(obj, args, kwargs, budget)
        result = super().call(context, obj, *(args if checked is None else checked), **kwargs)
        return budget.admit(result, "the result of a call")

    def join_values(self, join: Callable[[Iterable[Any]], str], values: tuple) -> str:
        """The `~` operator: like jinja2's str_join/markup_join, with its size reserved first."""
        budget = current_budget()
        budget.tick()
        if join is str_join:
            parts = [value if isinstance(value, str) else str(value) for value in values]
            budget.reserve(sum(map(len, parts)), "`~`")
            return budget.admit("".join(parts))
        budget.reserve(sum(budget.tree_size(value) for value in values), "`~`")
        return budget.admit(join(values))

    def concat(self, pieces: Iterable[str]) -> str:  # type: ignore[override]
        """The output of a block, macro or `{% set %}` body, with its size reserved first."""
        parts = pieces if isinstance(pieces, list) else list(pieces)
        budget = current_budget()
        budget.reserve(sum(map(len, parts)), "a block's output")
        return budget.admit("".join(parts))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        if super().wrap_str_format(value) is None:  # not a str's format or format_map
            return None
        template: str = value.__self__
        is_map = value.__name__ == "format_map"

        def bounded_format(*args: Any, **kwargs: Any) -> str:
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument and no keywords")
                args, kwargs = (), args[0]
            if isinstance(template, Markup):
                formatter: Any = _BoundedEscapeFormatter(self, escape=template.escape)
            else:
                formatter = _BoundedFormatter(self)
            formatter.budget = current_budget()
            return type(template)(formatter.vformat(template, args, kwargs))

        return update_wrapper(bounded_format, value)


def dump_json(value: Any, **options: Any) -> str:
    """json.dumps(value, **options), stopped as soon as its output passes the size limit."""
    budget = current_budget()
    if options.get("indent") is None:  # at most a few times the value's (bounded) size
        return budget.admit(json.dumps(value, **options), "the result of |tojson")
    parts, chars = [], 0
    for index, part in enumerate(json.JSONEncoder(**options).iterencode(value)):
        chars += len(part)
        budget.reserve(chars, "tojson")
        if index % TICK_EVERY == 0:
            budget.tick()
        parts.append(part)
    return budget.admit("".join(parts))


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    current_budget().reserve(n * max * 16, "lipsum()")
    return generate_lorem_ipsum(n, html, min, max)


def _center_size(value: Any, width: Any = 80) -> int:
    return max(len(str(value)), width if isinstance(width, int) else 0)


def _indent_size(s: Any, width: Any = 4, first: bool = False, blank: bool = False) -> int:
    indent = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    return len(str(s)) + (str(s).count("\n") + 1) * indent


def _wordwrap_size(s: Any, width: Any = 79, break_long_words: bool = True, wrapstring: Any = None,
                   break_on_hyphens: bool = True) -> int:
    text, width = str(s), width if isinstance(width, int) and width > 0 else 1
    wraps = 2 * len(text) // width + text.count("\n") + 1
    return len(text) + wraps * len(wrapstring if isinstance(wrapstring, str) else "\n")


# Filters that can build a result much larger than their input, and a bound on its size from
# their arguments (those after the environment or eval context a filter is passed).
_ESTIMATES: dict[str, Callable[..., int]] = {
    "center": _center_size,
    "indent": _indent_size,
    "wordwrap": _wordwrap_size,
    "replace": lambda s, old, new, count=None: _replace_size(str(s), str(old), str(new)),
    "format": lambda value, *args, **kwargs: _printf_size(str(value), kwargs or args,
                                                          current_budget()),
    "batch": lambda value, linecount, fill_with=None: linecount if isinstance(linecount, int) else 0,
    "slice": lambda value, slices, fill_with=None: slices if isinstance(slices, int) else 0,
}


def _bounded_filter(name: str, func: Callable) -> Callable:
    """`func` with the deadline checked, its estimate (if any) reserved and its result admitted."""
    if name == "join":
        func = _join_materialized(func)
    elif name == "sum":
        func = _sum_checked(func)
    estimate = _ESTIMATES.get(name)
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0
    what = f"the result of |{name}"

    @wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        budget = current_budget()
        budget.tick()
        if estimate is not None:
            budget.reserve(estimate(*args[skip:], **kwargs), what)
        return budget.admit(func(*args, **kwargs), what)

    return run


def _join_materialized(join: Callable) -> Callable:
    @pass_eval_context
    def bounded_join(eval_ctx: Any, value: Iterable[Any], d: str = "", attribute: Any = None) -> str:
        items = list(value)
        if attribute is not None:
            items = list(map(make_attrgetter(eval_ctx.environment, attribute), items))
        budget = current_budget()
        chars = sum(budget.tree_size(item) for item in items) + len(str(d)) * max(len(items) - 1, 0)
        budget.reserve(chars, "the result of |join")
        return join(eval_ctx, items, d)

    return bounded_join


def _sum_checked(sum_filter: Callable) -> Callable:
    @pass_environment
    def bounded_sum(environment: Any, iterable: Iterable[Any], attribute: Any = None,
                    start: Any = 0) -> Any:
        if not isinstance(start, (list, tuple)):  # numbers: the builtin sum, bit for bit
            return sum_filter(environment, iterable, attribute, start)
        if attribute is not None:
            iterable = map(make_attrgetter(environment, attribute), iterable)
        total = start
        for item in iterable:  # sequences: each `+` checked, not one quadratic C call
            total = environment.call_binop(None, "+", total, item)
        return total

    return bounded_sum
