"""Test support: what a Prometheus registry serves on /metrics, read back as the text format."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families


def served_samples(registry: CollectorRegistry) -> dict[str, float]:
    """Every sample the registry serves, by ``name{label="value",...}`` (labels sorted)."""
    found = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found
