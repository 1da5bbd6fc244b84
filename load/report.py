"""The human-readable summary table of a load run (the JSON file holds everything else)."""
from __future__ import annotations

from lumen.load.generator import LoadResult

_LATENCY_ROWS = (("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("TPOT", "tpot_ms"), ("E2E", "e2e_ms"))
_COLUMNS = ("mean", "p50", "p90", "p99", "max")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_summary(result: LoadResult) -> str:
    """A few aligned lines: counts and throughput, then one latency row per metric."""
    s, c = result.summary(), result.config
    shape = f"{s['requests']} requests" if c.duration_s is None else f"{c.duration_s:g} s"
    lines = [
        f"lumen bench: {result.target}, {shape}, concurrency {c.concurrency}, "
        f"max_new_tokens {c.max_new_tokens}, {len(c.prompts)} prompts ({c.prompt_source})",
        f"  successful requests      {s['successful']} / {s['requests']}",
        f"  duration                 {s['duration_s']:.2f} s",
        f"  request throughput       {s['requests_per_s']:.2f} req/s",
        f"  output token throughput  {s['output_tokens_per_s']:.1f} tok/s",
        f"  prompt / output tokens   {s['prompt_tokens']} / {s['completion_tokens']}",
    ]
    if s["finish_reasons"]:
        lines.append("  finish reasons           " + ", ".join(f"{k} {v}" for k, v in s["finish_reasons"].items()))
    lines.append("")
    lines.append(f"  {'(ms)':<6}" + "".join(f"{col:>10}" for col in _COLUMNS) + f"{'samples':>10}")
    for label, key in _LATENCY_ROWS:
        dist = s[key]
        lines.append(f"  {label:<6}" + "".join(f"{_ms(dist[col]):>10}" for col in _COLUMNS) + f"{dist['count']:>10}")
    if s["errors_by_status"]:
        lines.append("")
        lines.append("  errors                   " + ", ".join(f"{k} {v}" for k, v in s["errors_by_status"].items()))
        first = next(r for r in result.records if not r.ok)
        lines.append(f"  first error              {first.status}: {first.error}")
    return "\n".join(lines)
