"""The metric instruments the Lumen server records, created once per meter.

Names, units and bucket boundaries follow the OpenTelemetry GenAI semantic
conventions where they define the metric (`gen_ai.server.*`); Lumen's own
counters live under `lumen.*`. Attribute values must stay low-cardinality:
this module must never attach request ids, prompts or tenant names, and never
records anything per token (one call per request phase, not per step).
"""

from __future__ import annotations

from opentelemetry.context import Context
from opentelemetry.metrics import Meter

# Explicit bucket boundaries from the GenAI semantic conventions
# (gen-ai-metrics.md); passed as advisories so a user's View can still override.
TTFT_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
TPOT_BUCKETS_S: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
REQUEST_DURATION_BUCKETS_S: tuple[float, ...] = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip

# Semantic-convention attribute keys (the Python semconv package marks its
# GenAI constants deprecated while they move repositories, so they are spelled
# out here).
ATTR_OPERATION_NAME = "gen_ai.operation.name"
ATTR_PROVIDER_NAME = "gen_ai.provider.name"  # required on every gen_ai.server.* metric
ATTR_REQUEST_MODEL = "gen_ai.request.model"
ATTR_TOKEN_TYPE = "gen_ai.token.type"
ATTR_ERROR_TYPE = "error.type"
ATTR_FINISH_REASON = "finish_reason"
ATTR_STATUS = "status"

# Generate takes a prompt and continues it: the conventions' text_completion.
OPERATION_NAME = "text_completion"
# The conventions' provider name for a self-hosted server: its own name.
PROVIDER_NAME = "lumen"
# The gRPC status code name a successful request ends with.
STATUS_OK = "OK"
# A request's LoRA adapter, on its spans and as a metric attribute (absent for the base model).
ATTR_LORA_ADAPTER = "lumen.lora.adapter"
# Distinct adapter names the metrics label; later ones are counted as "other" (a server that loads
# and unloads adapters for days must not grow its series without bound).
MAX_ADAPTER_LABELS = 64


class EngineMetrics:
    """Records request-level latency, token and request counts.

    `status` arguments are gRPC status code names ("OK", "CANCELLED", ...);
    anything but "OK" also becomes the conventions' `error.type`.
    """

    def __init__(self, meter: Meter) -> None:
        self._ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token",
            unit="s",
            description="Time to generate first token for successful responses.",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS_S,
        )
        self._tpot = meter.create_histogram(
            "gen_ai.server.time_per_output_token",
            unit="s",
            description="Time per output token generated after the first token for successful responses.",
            explicit_bucket_boundaries_advisory=TPOT_BUCKETS_S,
        )
        self._duration = meter.create_histogram(
            "gen_ai.server.request.duration",
            unit="s",
            description=(
                "Generative AI server request duration such as time-to-last byte or last output token."
            ),
            explicit_bucket_boundaries_advisory=REQUEST_DURATION_BUCKETS_S,
        )
        self._tokens = meter.create_counter(
            "lumen.tokens", unit="{token}", description="Prompt (input) and generated (output) tokens."
        )
        self._requests = meter.create_counter(
            "lumen.requests", unit="{request}", description="Finished requests by finish reason and status."
        )
        self._active = meter.create_up_down_counter(
            "lumen.requests.active", unit="{request}", description="Requests accepted and not yet finished."
        )
        self._adapters: set[str] = set()

    def _attributes(self, model: str, adapter: str) -> dict[str, str]:
        attributes = _model_attributes(model)
        if adapter:
            if adapter not in self._adapters and len(self._adapters) < MAX_ADAPTER_LABELS:
                self._adapters.add(adapter)
            attributes[ATTR_LORA_ADAPTER] = adapter if adapter in self._adapters else "other"
        return attributes

    def record_first_token(self, seconds: float, model: str, context: Context | None = None,
                           adapter: str = "") -> None:
        """Time from receiving the request to its first generated token.

        `context` (the request's span) makes a sampled request's trace an exemplar of the point.
        `adapter`: the LoRA adapter the request ran with (only one that was loaded: bounded).
        """
        self._ttft.record(seconds, self._attributes(model, adapter), context=context)

    def record_finished(
        self,
        model: str,
        finish_reason: str,
        status: str,
        prompt_tokens: int,
        completion_tokens: int,
        duration_s: float,
        ttft_s: float | None,
        context: Context | None = None,
        adapter: str = "",
    ) -> None:
        """Everything known once a request ends, however it ended.

        `ttft_s` is None when no token was produced; TPOT then has no meaning,
        nor with a single token (there is no gap after the first to average).
        """
        attributes = self._attributes(model, adapter)
        duration_attributes = dict(attributes)
        if status != STATUS_OK:
            duration_attributes[ATTR_ERROR_TYPE] = status
        self._duration.record(duration_s, duration_attributes, context=context)
        if ttft_s is not None and completion_tokens > 1:
            self._tpot.record((duration_s - ttft_s) / (completion_tokens - 1), attributes, context=context)
        self._tokens.add(prompt_tokens, {**attributes, ATTR_TOKEN_TYPE: "input"})
        self._tokens.add(completion_tokens, {**attributes, ATTR_TOKEN_TYPE: "output"})
        self._requests.add(1, {**attributes, ATTR_FINISH_REASON: finish_reason, ATTR_STATUS: status})

    def request_started(self) -> None:
        self._active.add(1)

    def request_ended(self) -> None:
        self._active.add(-1)


def _model_attributes(model: str) -> dict[str, str]:
    return {ATTR_OPERATION_NAME: OPERATION_NAME, ATTR_PROVIDER_NAME: PROVIDER_NAME, ATTR_REQUEST_MODEL: model}
