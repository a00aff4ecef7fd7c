"""Quantiles of a Prometheus histogram over a window, from two scrapes of a /metrics page.

What PromQL's ``histogram_quantile(q, sum by (le) (increase(name_bucket[window])))`` gives:
the bucket counts of the later scrape minus the earlier one, summed over every series of the
histogram (all label sets, e.g. every router replica behind one endpoint), and the quantile
by linear interpolation inside the bucket it falls in. The lowest bucket starts at 0; a
quantile in the ``+Inf`` bucket is the highest finite bound.

Terms: ``le`` = a bucket's upper bound; bucket counts are cumulative (``le="+Inf"`` = count).
"""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class HistogramSnapshot:
    """One histogram as scraped, its series summed."""

    buckets: dict[float, float]  # le (math.inf included) -> cumulative count
    sum: float  # sum of the observed values
    count: float  # number of observations

    def minus(self, earlier: "HistogramSnapshot") -> "HistogramSnapshot":
        """The observations made between ``earlier`` and this scrape."""
        return HistogramSnapshot({le: n - earlier.buckets.get(le, 0.0) for le, n in self.buckets.items()},
                                 self.sum - earlier.sum, self.count - earlier.count)


def parse_histogram(text: str, name: str) -> HistogramSnapshot:
    """The histogram ``name`` (without ``_bucket``) in Prometheus text; empty when it is absent."""
    buckets: dict[float, float] = {}
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for s in family.samples:
            if s.name == f"{name}_bucket":
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
            elif s.name == f"{name}_sum":
                total += s.value
            elif s.name == f"{name}_count":
                count += s.value
    return HistogramSnapshot(buckets, total, count)


def scrape_histograms(url: str, names: Iterable[str], timeout: float = 10.0) -> dict[str, HistogramSnapshot]:
    """GET ``url`` (a /metrics page) once and parse each histogram of ``names`` from it."""
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        text = reply.read().decode()
    return {name: parse_histogram(text, name) for name in names}


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The ``q``-quantile (0..1) of cumulative ``buckets``; None when they hold no observation."""
    bounds = sorted(buckets)
    if not bounds or bounds[-1] != math.inf or buckets[math.inf] <= 0:
        return None
    rank = q * buckets[math.inf]
    lower, below = 0.0, 0.0  # the previous bucket's bound and cumulative count
    for le in bounds:
        n = buckets[le]
        if n >= rank and n > below:
            if le == math.inf:
                return lower  # beyond the highest finite bound: report that bound
            return lower + (le - lower) * (rank - below) / (n - below)
        lower, below = le, n
    return lower


def delay_summary(window: HistogramSnapshot, quantiles=(0.5, 0.9, 0.99)) -> dict | None:
    """count, mean and quantiles of a seconds histogram's window, in milliseconds, and its
    cumulative bucket counts by ``le`` in seconds (None if empty)."""
    if window.count <= 0:
        return None
    out = {"count": int(window.count), "mean": window.sum / window.count * 1000}
    for q in quantiles:
        out[f"p{round(q * 100)}"] = histogram_quantile(q, window.buckets) * 1000
    out["buckets_le_s"] = {("+Inf" if le == math.inf else repr(le)): int(n) for le, n in sorted(window.buckets.items())}
    return out
