"""Latency histograms: HdrHistogram (``hdrh``), written from numpy and merged exactly.

``hdrh``'s ``record_value`` costs ~1.4 µs per value in Python, too slow for every packet of a
load test. ``record(histogram, values)`` computes the same bucket indices with numpy and adds the
counts into the histogram's own counts array, so percentiles, ``encode()`` and
``decode_and_add()`` (how workers ship histograms to the master) stay ``hdrh``'s. Values are
integers in the histogram's unit (the load tester uses microseconds).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 120_000_000  # two minutes: a turn that takes longer is a failure anyway
SIGNIFICANT_FIGURES = 3
PERCENTILES = {"p50": 50.0, "p95": 95.0, "p99": 99.0, "p999": 99.9}


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)


def counts_of(histogram: HdrHistogram) -> npt.NDArray[np.int64]:
    """A numpy view of the histogram's counts (no copy)."""
    return np.ctypeslib.as_array(histogram.counts)


def indices(histogram: HdrHistogram, values: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The counts index of every value, as ``HdrHistogram._counts_index_for`` computes it."""
    h = histogram
    masked = values.astype(np.int64) | h.sub_bucket_mask
    bit_length = np.floor(np.log2(masked.astype(np.float64))).astype(np.int64) + 1
    bucket = bit_length - h.unit_magnitude - (h.sub_bucket_half_count_magnitude + 1)
    sub_bucket = values >> (bucket + h.unit_magnitude)
    base = (bucket + 1) << h.sub_bucket_half_count_magnitude
    return np.asarray(base + sub_bucket - h.sub_bucket_half_count, dtype=np.int64)


def record(histogram: HdrHistogram, values: npt.ArrayLike) -> int:
    """Add every value (clipped to the trackable range) to ``histogram``; returns how many."""
    array = np.clip(np.asarray(values, dtype=np.int64), 0, histogram.highest_trackable_value)
    if array.size == 0:
        return 0
    index = indices(histogram, array)
    counts = counts_of(histogram)
    np.add.at(counts, index, 1)
    histogram.total_count += int(array.size)
    histogram.min_value = min(histogram.min_value, int(array.min()))
    histogram.max_value = max(histogram.max_value, int(array.max()))
    return int(array.size)


def merged(encoded: list[str]) -> HdrHistogram:
    """One histogram holding every sample of the encoded ones."""
    total = new_histogram()
    for text in encoded:
        total.decode_and_add(text)
    return total


def summary_ms(histogram: HdrHistogram) -> dict[str, Any] | None:
    """p50/p95/p99/p99.9/max in milliseconds and the sample count, or None when empty."""
    if histogram.get_total_count() == 0:
        return None
    values: dict[str, Any] = {
        name: histogram.get_value_at_percentile(p) / 1000 for name, p in PERCENTILES.items()
    }
    values["max"] = histogram.get_max_value() / 1000
    values["count"] = histogram.get_total_count()
    return values
