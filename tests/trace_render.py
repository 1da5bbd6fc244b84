"""Render received spans as an indented tree, the way the README's "Seeing a request" shows them.

Siblings with the same name (a request's `draft` and `verify` spans) are folded into one
line with their count, total duration and summed counts. `timings=False` leaves durations
out, so a rendering can be compared with the README whatever the machine's speed.
"""
from __future__ import annotations

from tests.otlp_records import SpanRecord

# Attributes worth a reader's eye, per span name (everything else is in the trace).
SHOWN = {
    "lumen.v1.Inference/Generate": ("rpc.method", "rpc.response.status_code"),
    "text_completion": ("gen_ai.request.model", "gen_ai.request.max_tokens", "gen_ai.request.temperature",
                        "gen_ai.response.finish_reasons", "gen_ai.usage.input_tokens",
                        "gen_ai.usage.output_tokens", "lumen.speculative.draft_tokens",
                        "lumen.speculative.accepted_tokens"),
    "tokenize": ("lumen.prompt_tokens",),
    "prefill": ("lumen.prompt_tokens", "lumen.cached_tokens", "lumen.batch.steps", "lumen.batch.size.max"),
    "decode": ("lumen.completion_tokens", "lumen.batch.steps", "lumen.batch.size.min", "lumen.batch.size.max",
               "lumen.preemptions"),
    "draft": ("lumen.speculative.method", "lumen.speculative.proposed_tokens"),
    "verify": ("lumen.speculative.proposed_tokens", "lumen.speculative.accepted_tokens"),
    "engine_step": ("lumen.engine.batch_size", "lumen.engine.step.tokens", "lumen.engine.prefill_requests"),
}
SUMMED = ("lumen.speculative.proposed_tokens", "lumen.speculative.accepted_tokens")


def _label(span: SpanRecord) -> str:
    return "text_completion" if span.name.startswith("text_completion ") else span.name


def _attrs(span: SpanRecord, keys: tuple[str, ...], folded: list[SpanRecord]) -> str:
    parts = []
    for key in keys:
        if key in SUMMED and len(folded) > 1:
            parts.append(f"{key}={sum(s.attributes.get(key, 0) for s in folded)} (sum)")
        elif key in span.attributes and not (len(folded) > 1 and key not in SUMMED and key.endswith("_tokens")):
            value = span.attributes[key]
            parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return "  ".join(parts)


def _line(prefix: str, folded: list[SpanRecord], timings: bool) -> str:
    span = folded[0]
    name = span.name if len(folded) == 1 else f"{span.name} x{len(folded)}"
    kind = "" if span.kind == "INTERNAL" else f" [{span.kind}]"
    took = f"  {sum(s.end_ns - s.start_ns for s in folded) / 1e6:.2f} ms" if timings else ""
    attrs = _attrs(span, SHOWN.get(_label(span), ()), folded)
    return f"{prefix}{name}{kind}{took}" + (f"  {attrs}" if attrs else "")


def render(spans: list[SpanRecord], root: SpanRecord, timings: bool = True) -> str:
    """The tree under `root`, children in start order, same-name siblings folded."""
    by_parent: dict[str, list[SpanRecord]] = {}
    for span in spans:
        if span.trace_id == root.trace_id:
            by_parent.setdefault(span.parent_span_id, []).append(span)
    lines = [_line("", [root], timings)]

    def walk(parent: SpanRecord, indent: str) -> None:
        groups: dict[str, list[SpanRecord]] = {}
        for child in sorted(by_parent.get(parent.span_id, []), key=lambda s: s.start_ns):
            groups.setdefault(child.name, []).append(child)
        items = list(groups.values())
        for i, folded in enumerate(items):
            last = i == len(items) - 1
            lines.append(_line(indent + ("└─ " if last else "├─ "), folded, timings))
            if len(folded) == 1:
                walk(folded[0], indent + ("   " if last else "│  "))

    walk(root, "")
    return "\n".join(lines)
