"""Prometheus metrics of the voice sessions, in the app's registry.

I/O layer (prometheus-client). Turn records feed the per-stage latency histograms; the
resilience wrappers' ``.stats`` (retries, failures, fallbacks, calls refused by an open
circuit, breaker transitions) and circuit state, the owned loops' crash counts, Redis's health,
the calls' capacity and draining, the measured CPU and the load gauge are read at scrape time.
"""

from __future__ import annotations

import bisect
import gc
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from pipeline.pool import PipelinePool
from pipeline.speech_cache import SpeechCache
from pipeline.turns import TurnRecord
from transceiver import background
from transceiver.cpu_cost import CpuMeter

LATENCY_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)
# stage label -> TurnRecord field (milliseconds)
STAGES = {
    "stt": "stt_ms",
    "llm_first_token": "llm_first_token_ms",
    "tts_first_audio": "tts_first_audio_ms",
}
KNOWN_CLIENT_EVENTS = frozenset(
    {
        "session.update",
        "conversation.item.create",
        "response.create",
        "response.cancel",
        "input_audio_buffer.clear",
        "input_audio_buffer.commit",
        "output_audio_buffer.clear",
        "conversation.item.retrieve",
        "conversation.item.truncate",
        "conversation.item.delete",
    }
)
RESILIENCE_COUNTERS = (
    "attempts",
    "failures",
    "retries",
    "retries_denied",
    "short_circuited",
    "fallbacks",
)
BREAKER_STATES = ("closed", "open", "half_open")
GC_PAUSE_BUCKETS_S = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
GC_GENERATIONS = ("0", "1", "2")


class RealtimeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.stage_s = Histogram(
            "transceiver_turn_stage_seconds",
            "Per-turn latency by stage (stt: speech end to final transcript; llm_first_token: "
            "final transcript to first token; tts_first_audio: TTS request to first audio; "
            "speech_end_to_audio_out: speech end to the first frame handed to the encoder)",
            ["stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.turns = Counter(
            "transceiver_turns", "Answered turns", ["interrupted"], registry=registry
        )
        self.events = Counter(
            "transceiver_realtime_events",
            "oai-events data-channel events by direction and type",
            ["direction", "type"],
            registry=registry,
        )
        self.provider_errors = Counter(
            "transceiver_provider_errors",
            "Errors the pipeline reported by retryability",
            ["retryable"],
            registry=registry,
        )
        self.early_answers = Counter(
            "transceiver_early_answers",
            "Answers started at a pause before the turn ended (semantic_vad): used (the turn "
            "ended there) or discarded unheard (the user went on)",
            ["outcome"],
            registry=registry,
        )
        self.early_answers_wasted_s = Counter(
            "transceiver_early_answers_wasted_seconds",
            "Providers' time (model, first chunk's speech) spent on early answers discarded "
            "unheard",
            registry=registry,
        )
        self.tool_calls_dropped = Counter(
            "transceiver_tool_calls_dropped",
            "Function calls a model made beyond a turn's first when the response asked for one "
            "call a turn (parallel_tool_calls false): not made, not kept in the conversation",
            registry=registry,
        )

    def turn(self, record: TurnRecord, first_frame_sent_s: float | None) -> None:
        self.turns.labels(str(record.interrupted).lower()).inc()
        self.early_answers.labels("used").inc(record.answered_early)
        self.early_answers.labels("discarded").inc(record.early_answers_discarded)
        self.early_answers_wasted_s.inc(record.early_answers_wasted_ms / 1000)
        self.tool_calls_dropped.inc(record.tool_calls_dropped)
        for stage, name in STAGES.items():
            value_ms = getattr(record, name)
            if value_ms is not None:  # (an early answer's stages may precede speech end: 0)
                self.stage_s.labels(stage).observe(max(0.0, value_ms) / 1000)
        first_out_s = first_frame_sent_s or record.first_frame_out_s
        if record.speech_stopped_s is not None and first_out_s is not None:
            waited_s = first_out_s - record.speech_stopped_s
            self.stage_s.labels("speech_end_to_audio_out").observe(waited_s)

    def client_event(self, kind: str) -> None:
        """Counted by type; names we do not know share one label (bounded cardinality)."""
        label = kind if kind in KNOWN_CLIENT_EVENTS else "invalid"
        self.events.labels("client", label).inc()

    def server_event(self, kind: str) -> None:
        self.events.labels("server", kind).inc()

    def provider_error(self, retryable: bool) -> None:
        self.provider_errors.labels(str(retryable).lower()).inc()


class ResilienceCollector(Collector):
    """The hardened providers' counters (``pipeline.guards.ResilienceStats``) and circuit
    breakers (``pipeline.resilience``: ``circuit``, the state of the last transition), per
    provider."""

    def __init__(self, providers: Iterable[Any]) -> None:
        hardened = [p for p in providers if hasattr(p, "stats")]
        self._stats = [p.stats for p in hardened]
        self._circuits = [p for p in hardened if hasattr(p, "circuit")]

    def collect(self) -> Iterator[Metric]:
        for counter in RESILIENCE_COUNTERS:
            family = CounterMetricFamily(
                f"transceiver_provider_{counter}",
                f"Provider calls: {counter.replace('_', ' ')} (pipeline resilience wrappers)",
                labels=["provider"],
            )
            for stats in self._stats:
                for provider, count in sorted(getattr(stats, counter).items()):
                    family.add_metric([provider], count)
            yield family
        yield from self._breakers()

    def _breakers(self) -> Iterator[Metric]:
        circuit_open = GaugeMetricFamily(
            "transceiver_provider_circuit_open",
            "1 while a provider's circuit breaker is not closed (open: calls refused and passed "
            "to the fallback; half-open: one probe at a time), else 0",
            labels=["provider"],
        )
        for hardened in self._circuits:
            circuit_open.add_metric([hardened.name], float(hardened.circuit != "closed"))
        yield circuit_open
        transitions = CounterMetricFamily(
            "transceiver_provider_circuit_transitions",
            "Circuit breaker transitions, by provider and the state entered",
            labels=["provider", "state"],
        )
        for stats in self._stats:
            for key, count in sorted(stats.breaker_transitions.items()):
                provider, _, state = key.rpartition(":")
                transitions.add_metric([provider, state], count)
        yield transitions


_frozen_objects = 0  # counted once, by freeze_heap: counting walks the whole frozen heap


def freeze_heap() -> int:
    """Collect, then move every object so far into the collector's permanent generation (a full
    collection no longer walks them); returns how many, which ``transceiver_gc_frozen_objects``
    reports from then on. Counted here, once: ``gc.get_freeze_count()`` walks every frozen
    object (~10 ms for a transceiver's start-up heap, on the event loop), too dear for every
    scrape of ``/metrics``."""
    global _frozen_objects
    gc.collect()
    gc.freeze()
    _frozen_objects = gc.get_freeze_count()
    return _frozen_objects


class GcPauses(Collector):
    """How long each of Python's cyclic garbage collections held the process, by generation
    (``gc.callbacks``): a collection runs on the thread whose allocation triggered it, most
    often the event loop's, and everything on the loop waits for it. ``with GcPauses(registry):``
    observes while inside. The callback runs at every collection (gen 0 many times a second), so
    it only reads the clock and adds to plain counts: two clock reads, a bisect and two list
    updates; the histogram is built from the counts at scrape time. Beside them, how many
    objects start-up froze (``gc.freeze``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # Per generation: pauses per bucket (``GC_PAUSE_BUCKETS_S``, then +Inf) and their sum.
        # Collections never overlap (one at a time, the GIL held); a scrape read between a
        # bucket's update and the sum's sees that one pause half counted, the next scrape whole.
        self._counts = [[0] * (len(GC_PAUSE_BUCKETS_S) + 1) for _ in GC_GENERATIONS]
        self._sums_s = [0.0] * len(GC_GENERATIONS)
        self._started_s = 0.0
        registry.register(self)
        frozen = Gauge(
            "transceiver_gc_frozen_objects",
            "Objects kept out of the collector's reach after start-up (TRANSCEIVER_GC_FREEZE)",
            registry=registry,
        )
        frozen.set_function(lambda: _frozen_objects)

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        gc.callbacks.remove(self._on_gc)

    def _on_gc(
        self,
        phase: str,
        info: dict[str, int],
        clock: Callable[[], float] = time.perf_counter,
        bucket: Callable[[Sequence[float], float], int] = bisect.bisect_left,
    ) -> None:
        if phase == "start":
            self._started_s = clock()
            return
        pause_s = clock() - self._started_s
        generation = info["generation"]
        self._counts[generation][bucket(GC_PAUSE_BUCKETS_S, pause_s)] += 1  # le: bound >= pause
        self._sums_s[generation] += pause_s

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "transceiver_gc_pause_seconds",
            "How long each cyclic garbage collection held the process, by generation",
            labels=["generation"],
        )
        bounds = [*map(floatToGoString, GC_PAUSE_BUCKETS_S), "+Inf"]
        for generation, counts in zip(GC_GENERATIONS, self._counts, strict=True):
            cumulative = list(itertools.accumulate(counts))
            sum_s = self._sums_s[int(generation)]
            family.add_metric([generation], list(zip(bounds, cumulative, strict=True)), sum_s)
        yield family


class TaskCrashCollector(Collector):
    """Crashes of the owned background loops (``transceiver.background``), by task name."""

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "transceiver_task_crashes",
            "Owned background loops that crashed (each is logged and restarted)",
            labels=["task"],
        )
        for task, count in sorted(background.crash_counts.items()):
            family.add_metric([task], count)
        yield family


class RedisHealthCollector(Collector):
    """How long Redis has been unreachable in a row (0 while it answers)."""

    def __init__(self, down_for_s: Callable[[], float]) -> None:
        self._down_for_s = down_for_s

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "transceiver_redis_unreachable_seconds",
            "Seconds Redis has been unreachable in a row (0 while it answers); calls go on",
            value=self._down_for_s(),
        )


@dataclass(frozen=True)
class CapacityReadings:
    """What ``CapacityCollector`` reads at scrape time (callables: read when scraped)."""

    calls: Callable[[], int]
    capacity: Callable[[], int]
    draining: Callable[[], bool]
    meter: CpuMeter | None = None
    overloaded: Callable[[], bool] = lambda: False  # the agents' shared work (pipeline pool)


class CapacityCollector(Collector):
    """How many calls this transceiver takes (``TRANSCEIVER_CAPACITY``), whether it is
    draining, its measured CPU (``transceiver.cpu_cost``: cores, cores per call, the budget)
    and ``transceiver_load``, the one number an autoscaler reads: the larger of calls over
    capacity and measured CPU over the budget, 1 while the pipeline pool is saturated (1.0:
    no room for another call)."""

    def __init__(self, readings: CapacityReadings) -> None:
        self._readings = readings

    def collect(self) -> Iterator[Metric]:
        readings = self._readings
        yield GaugeMetricFamily(
            "transceiver_capacity",
            "Calls this transceiver takes at most (TRANSCEIVER_CAPACITY); beyond, offers get 503",
            value=readings.capacity(),
        )
        yield GaugeMetricFamily(
            "transceiver_draining",
            "1 from SIGTERM on: no new calls, the live ones handed over to other transceivers",
            value=float(readings.draining()),
        )
        if readings.meter is not None:
            yield from _cpu(readings.meter)
        yield GaugeMetricFamily(
            "transceiver_load",
            "Room in use, 0..1 and beyond: the larger of calls over capacity and measured CPU "
            "over TRANSCEIVER_CPU_BUDGET_CORES; 1 while the pipeline pool is saturated",
            value=_load(readings),
        )


def _load(readings: CapacityReadings) -> float:
    if readings.overloaded():
        return 1.0
    calls, capacity = readings.calls(), readings.capacity()
    if readings.meter is None:
        return calls / capacity
    return readings.meter.load(calls, capacity)


def _cpu(meter: CpuMeter) -> Iterator[Metric]:
    """The measured CPU; per call only once calls have run in the window."""
    reading = meter.measure()
    if reading.cores is not None:
        yield GaugeMetricFamily(
            "transceiver_cpu_cores",
            "CPU this process used over the last TRANSCEIVER_CPU_WINDOW_S, in cores",
            value=reading.cores,
        )
    if reading.cores_per_call is not None:
        yield GaugeMetricFamily(
            "transceiver_cpu_cores_per_call",
            "Measured CPU per call over the window, in cores (the process's idle cost "
            "included, so pessimistic at few calls); admission projects with it",
            value=reading.cores_per_call,
        )
    yield GaugeMetricFamily(
        "transceiver_cpu_budget_cores",
        "CPU a worker may use, in cores (TRANSCEIVER_CPU_BUDGET_CORES; 0: not enforced)",
        value=meter.budget.budget_cores,
    )


class StoredImagesCollector(Collector):
    """Images of stored sessions left out of Redis for their session's image budget."""

    def __init__(self, dropped: Callable[[], int]) -> None:
        self._dropped = dropped

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "transceiver_session_images_dropped",
            "Images not stored with their session (TRANSCEIVER_SESSION_IMAGE_BYTES): the oldest "
            "first; a resumed session's items show without them",
            value=self._dropped(),
        )


class LeaseCollector(Collector):
    """How many stored sessions this transceiver holds the lease of (and renews)."""

    def __init__(self, held: Callable[[], int]) -> None:
        self._held = held

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "transceiver_session_leases",
            "Stored sessions whose lease this transceiver holds and renews",
            value=self._held(),
        )


POOL_WAIT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class SubstitutesCollector(Collector):
    """The pipeline's stages that run another provider than the one configured for them
    (``pipeline.assembly.Providers.substitutes``: PIPELINE_LLM=local whose model did not load
    answers with the rule-based agent), with the reason."""

    def __init__(self, substitutes: Mapping[str, str]) -> None:
        self._substitutes = substitutes

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "transceiver_pipeline_stage_substituted",
            "1 for a pipeline stage whose configured provider could not start, so another "
            "answers (reason: why)",
            labels=["stage", "reason"],
        )
        for stage, reason in sorted(self._substitutes.items()):
            family.add_metric([stage, reason[:300]], 1.0)
        yield family


class PipelinePoolCollector(Collector):
    """The offline pipeline's shared pool (``pipeline.pool``): its size, jobs running and
    waiting per stage, whether it refuses new calls, and (a histogram observed as jobs start)
    how long jobs waited for a slot."""

    def __init__(self, pool: PipelinePool, registry: CollectorRegistry) -> None:
        self._pool = pool
        wait_s = Histogram(
            "transceiver_pipeline_pool_wait_seconds",
            "How long a heavy offline job waited for a slot of the pool, by stage (stt: an "
            "utterance for a decoder; tts: a sentence for a synthesis thread)",
            ["stage"],
            buckets=POOL_WAIT_BUCKETS_S,
            registry=registry,
        )
        for stage in pool.stages:
            wait_s.labels(stage.stage)  # served at 0 before the first job
        pool.observe_waits(lambda stage, waited: wait_s.labels(stage).observe(waited))

    def collect(self) -> Iterator[Metric]:
        pool = self._pool
        yield GaugeMetricFamily(
            "transceiver_pipeline_pool_size",
            "Slots per heavy offline stage (PIPELINE_POOL_SIZE; default the usable cores)",
            value=pool.size,
        )
        busy = GaugeMetricFamily(
            "transceiver_pipeline_pool_busy",
            "Heavy offline jobs running, by stage",
            labels=["stage"],
        )
        depth = GaugeMetricFamily(
            "transceiver_pipeline_pool_queue_depth",
            "Heavy offline jobs waiting for a slot, by stage",
            labels=["stage"],
        )
        for stage in pool.stages:
            busy.add_metric([stage.stage], stage.busy)
            depth.add_metric([stage.stage], stage.queue_depth)
        yield busy
        yield depth
        yield GaugeMetricFamily(
            "transceiver_pipeline_pool_saturated",
            "1 while the pool is saturated (a job waited over PIPELINE_POOL_MAX_WAIT_MS lately, "
            "or more than PIPELINE_POOL_MAX_QUEUE wait): new calls get 503 and /readyz is red",
            value=float(pool.saturation() is not None),
        )
        if pool.speech_cache is not None:
            yield from speech_cache_metrics(pool.speech_cache)


def speech_cache_metrics(cache: SpeechCache) -> Iterator[Metric]:
    """The offline TTS's kept speech (``pipeline.speech_cache``): lookups and what it holds."""
    lookups = CounterMetricFamily(
        "transceiver_pipeline_speech_cache_lookups",
        "Texts looked up in the synthesized-speech cache, by result (hit: played from it)",
        labels=["result"],
    )
    lookups.add_metric(["hit"], cache.hits)
    lookups.add_metric(["miss"], cache.misses)
    yield lookups
    yield CounterMetricFamily(
        "transceiver_pipeline_speech_cache_evictions",
        "Kept texts dropped to stay within PIPELINE_PIPER_CACHE_MB",
        value=cache.evictions,
    )
    yield GaugeMetricFamily(
        "transceiver_pipeline_speech_cache_bytes",
        "Synthesized speech kept (PCM bytes); the bound is PIPELINE_PIPER_CACHE_MB",
        value=cache.bytes,
    )
