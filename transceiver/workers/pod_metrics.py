"""The pod's ``/metrics``: every worker's exposition folded into one, plus a per-worker view.

I/O-free but not pure (it uses prometheus-client's parser and writer). A sample present in
several workers (same name and labels) becomes one: summed by default (counters, histogram
buckets, calls, capacity, CPU cores, budgets), the largest for states where one bad worker is
the pod's news (draining, circuit open, Redis unreachable, pool saturated), the smallest for
``transceiver_link_keyed_relays`` (every worker must hear every relay) and the mean for the
ratios (``transceiver_load``, ``transceiver_cpu_cores_per_call``). So the queries written for
one process (``sum(transceiver_sessions) / sum(transceiver_capacity)``) keep their meaning.

Each worker's capacity figures are served again as ``transceiver_worker_*{worker="i"}``
(sessions, capacity, CPU, cost per call, load, draining): how the pod's calls spread.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

Combine = Callable[[list[float]], float]
LARGEST = frozenset(
    {
        "transceiver_draining",
        "transceiver_redis_unreachable_seconds",
        "transceiver_provider_circuit_open",
        "transceiver_pipeline_pool_saturated",
    }
)
SMALLEST = frozenset({"transceiver_link_keyed_relays"})
MEAN = frozenset({"transceiver_load", "transceiver_cpu_cores_per_call"})
PER_WORKER = (
    "transceiver_sessions",
    "transceiver_capacity",
    "transceiver_cpu_cores",
    "transceiver_cpu_cores_per_call",
    "transceiver_load",
    "transceiver_draining",
)
SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def _combine(family: str, sample: str) -> Combine:
    if sample.endswith("_created"):
        return min
    if family in LARGEST:
        return max
    if family in SMALLEST:
        return min
    if family in MEAN:
        return statistics.fmean
    return sum


def fold(expositions: Mapping[int, str]) -> list[Metric]:
    """The workers' expositions (by worker index) as the pod's metric families."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[SampleKey, list[float]]] = {}
    for text in expositions.values():
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            kept = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                kept.setdefault(key, []).append(sample.value)
    for name, family in families.items():
        for (sample_name, labels), found in values[name].items():
            family.add_sample(sample_name, dict(labels), _combine(name, sample_name)(found))
    return [*families.values(), *per_worker(expositions)]


def per_worker(expositions: Mapping[int, str]) -> Iterator[Metric]:
    """``transceiver_worker_*{worker}``: each worker's own capacity figures."""
    by_name: dict[str, Metric] = {}
    for index, text in sorted(expositions.items()):
        for family in text_string_to_metric_families(text):
            if family.name not in PER_WORKER or not family.samples:
                continue
            name = "transceiver_worker_" + family.name.removeprefix("transceiver_")
            help_text = f"{family.documentation} (one worker's; the pod's is {family.name})"
            metric = by_name.setdefault(name, Metric(name, help_text, "gauge"))
            metric.add_sample(name, {"worker": str(index)}, family.samples[0].value)
    yield from by_name.values()


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def exposition(families: Iterable[Metric]) -> bytes:
    """The Prometheus text exposition of ``families``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)
