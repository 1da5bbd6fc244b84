"""Engine-step metrics: batch composition, queue depth and time, KV cache use, preemptions, prefix-cache hits,
speculative drafts and how many of their tokens were accepted.

Recorded once per engine step from the engine's step statistics (any object with
the fields of `lumen.engine.core.step_stats.StepStats`; this package never imports the engine).
Gauges read the latest snapshot of the queues and the KV cache, so reading them never touches
engine state: a step's statistics, or the engine's load after a change between steps (an
abort with nothing left to run would otherwise leave them stale until the next request).
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STEP_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# The request-duration buckets of the GenAI conventions, from 1 ms: a queue wait is a part of a request.
QUEUE_TIME_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                        40.96, 81.92)
STEP_DURATION_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _Gauges:
    """The observable gauges of one meter, created once and read for every model's StepMetrics: a
    meter keeps only the first callbacks of an instrument name, so per-model gauges would report
    the first model alone."""

    def __init__(self, meter: Meter) -> None:
        self.members: list[StepMetrics] = []
        gauge = meter.create_observable_gauge
        gauge("lumen.engine.requests", callbacks=[self._each("_observe_requests")], unit="{request}",
              description="Requests in the engine by state (running, waiting).")
        # "_ratio" in the name: the collector's Prometheus exporter appends it to a gauge of unit 1 and
        # the Python one does not, so with it in the name both paths expose lumen_kv_cache_usage_ratio.
        gauge("lumen.kv_cache.usage_ratio", callbacks=[self._each("_observe_usage")], unit="1",
              description="Fraction of the KV cache blocks in use (free cached blocks count as free).")
        gauge("lumen.kv_cache.blocks", callbacks=[self._each("_observe_blocks")], unit="{block}",
              description="KV cache blocks by state (used, free).")
        gauge("lumen.model.memory", callbacks=[self._each("_observe_memory")], unit="By",
              description="Memory a model holds where it computes, by part: weights (on a GPU; on the CPU "
                          "they stay as loaded and are not counted) and kv_cache (the whole preallocated pool).")

    def _each(self, method: str):
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [obs for member in self.members for obs in getattr(member, method)(options)]
        return observe


_METER_GAUGES: "weakref.WeakKeyDictionary[Meter, _Gauges]" = weakref.WeakKeyDictionary()


def _gauges_of(meter: Meter) -> _Gauges:
    if meter not in _METER_GAUGES:
        _METER_GAUGES[meter] = _Gauges(meter)
    return _METER_GAUGES[meter]


class StepMetrics:
    def __init__(self, meter: Meter, model: str) -> None:
        self.attributes = {"gen_ai.request.model": model}
        self.latest: Any = None  # the latest load: num_running, num_waiting, kv_blocks_used, kv_blocks_free
        self._batch = meter.create_histogram(
            "lumen.engine.batch_size", unit="{request}", description="Sequences computed together in one engine step.",
            explicit_bucket_boundaries_advisory=BATCH_BUCKETS)
        self._tokens = meter.create_histogram(
            "lumen.engine.step.tokens", unit="{token}", description="Tokens computed in one engine step.",
            explicit_bucket_boundaries_advisory=STEP_TOKEN_BUCKETS)
        self._duration = meter.create_histogram(
            "lumen.engine.step.duration", unit="s", description="Wall time of one engine step.",
            explicit_bucket_boundaries_advisory=STEP_DURATION_BUCKETS_S)
        self._preemptions = meter.create_counter(
            "lumen.engine.preemptions", unit="{request}", description="Requests preempted for lack of KV blocks.")
        self._hit_tokens = meter.create_counter(
            "lumen.prefix_cache.hit_tokens", unit="{token}", description="Prompt tokens found in the prefix cache.")
        self._hits = meter.create_counter(
            "lumen.prefix_cache.hits", unit="{request}", description="Admitted requests that reused cached blocks.")
        self._spec_drafts = meter.create_counter(
            "lumen.speculative.drafts", unit="{draft}", description="Speculative drafts verified by the model.")
        self._spec_draft_tokens = meter.create_counter(
            "lumen.speculative.draft_tokens", unit="{token}", description="Speculative draft tokens verified.")
        self._spec_accepted = meter.create_counter(
            "lumen.speculative.accepted_tokens", unit="{token}", description="Speculative draft tokens accepted.")
        self._spec_accepted_at = meter.create_counter(
            "lumen.speculative.accepted_tokens_per_position", unit="{token}",
            description="Accepted draft tokens by their position in the draft (0 = the first drafted token); "
                        "over lumen.speculative.drafts, the fraction of drafts accepted up to each position.")
        self._queue_time = meter.create_histogram(
            "lumen.request.queue_time", unit="s",
            description="Time from a request's arrival (after tokenization) to its first admission into a batch.",
            explicit_bucket_boundaries_advisory=QUEUE_TIME_BUCKETS_S)
        self.memory: dict[str, int] = {}   # part -> bytes (set_memory)
        self.device = ""
        _gauges_of(meter).members.append(self)

    def set_memory(self, device: str, weights_bytes: int, kv_cache_bytes: int) -> None:
        """The model's placement and sizes, once its engine is built."""
        self.device = device
        self.memory = {"weights": weights_bytes, "kv_cache": kv_cache_bytes}

    def _observe_memory(self, options: CallbackOptions) -> Iterable[Observation]:
        attributes = {**self.attributes, "device": self.device}
        return [Observation(value, {**attributes, "part": part}) for part, value in self.memory.items()
                if part == "kv_cache" or value]

    def observe_load(self, load: Any) -> None:
        """Called by the engine thread when its queues or KV cache change between steps."""
        self.latest = load

    def observe(self, stats: Any) -> None:
        """Called by the engine thread after each step."""
        self.latest = stats
        self._batch.record(stats.batch_size, self.attributes)
        self._tokens.record(stats.num_tokens, self.attributes)
        self._duration.record(stats.duration_s, self.attributes)
        if stats.preemptions:
            self._preemptions.add(stats.preemptions, self.attributes)
        if stats.prefix_hits:
            self._hit_tokens.add(stats.cached_tokens, self.attributes)
            self._hits.add(stats.prefix_hits, self.attributes)
        if stats.spec_drafts:
            self._observe_speculation(stats)
        for seconds in stats.queue_times_s:
            self._queue_time.record(seconds, self.attributes)

    def _observe_speculation(self, stats: Any) -> None:
        self._spec_drafts.add(stats.spec_drafts, self.attributes)
        self._spec_draft_tokens.add(stats.spec_draft_tokens, self.attributes)
        self._spec_accepted.add(stats.spec_accepted_tokens, self.attributes)
        # Positions are bounded by the longest draft (16 tokens): a low-cardinality attribute.
        # Zeros are recorded too, so a position that is never accepted still shows up.
        for position, accepted in enumerate(stats.spec_accepted_per_position):
            self._spec_accepted_at.add(accepted, {**self.attributes, "position": position})

    def _observe_requests(self, options: CallbackOptions) -> Iterable[Observation]:
        s = self.latest
        if s is None:
            return []
        return [Observation(s.num_running, {**self.attributes, "state": "running"}),
                Observation(s.num_waiting, {**self.attributes, "state": "waiting"})]

    def _observe_usage(self, options: CallbackOptions) -> Iterable[Observation]:
        s = self.latest
        total = s.kv_blocks_used + s.kv_blocks_free if s is not None else 0
        return [Observation(s.kv_blocks_used / total, self.attributes)] if total else []

    def _observe_blocks(self, options: CallbackOptions) -> Iterable[Observation]:
        s = self.latest
        if s is None:
            return []
        return [Observation(s.kv_blocks_used, {**self.attributes, "state": "used"}),
                Observation(s.kv_blocks_free, {**self.attributes, "state": "free"})]


def observe_device_memory(meter: Meter, read: Callable[[], list[tuple[str, str, int]]]) -> None:
    """lumen.device.memory.used: `read()` gives (device, state, bytes) when the metrics are
    collected (the server passes torch's allocated and reserved memory on each GPU in use)."""
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(value, {"device": device, "state": state}) for device, state, value in read()]

    meter.create_observable_gauge(
        "lumen.device.memory.used", unit="By", callbacks=[observe],
        description="torch's memory on each GPU in use, by state: allocated (tensors) and reserved (its cache).")

