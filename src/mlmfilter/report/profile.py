"""The distribution of each score column from two streaming passes: range, then a fine histogram.

Quantiles, the kept fraction at a threshold and percentile ranks all come from the fine
histogram (``FINE_BINS`` equal bins between min and max), whatever the run's size: the
q-quantile is within one bin width, (max - min) / FINE_BINS, of the ceil(q n)-th smallest value;
the kept fraction is exact at every bin edge and at max, interpolated in between.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow.dataset as ds

from mlmfilter.report.scan import HistogramCollector, RangeCollector, scan

FINE_BINS = 4096
DEFAULT_QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


@dataclass
class ColumnProfile:
    name: str
    rows: int  # every row of the table, errored ones included
    count: int  # rows holding a value
    missing: int
    low: float | None
    high: float | None
    mean: float | None
    edges: np.ndarray  # FINE_BINS + 1 edges
    counts: np.ndarray  # FINE_BINS counts; the last bin includes max
    at_high: int = 0  # rows holding exactly max

    @property
    def empty(self) -> bool:
        return self.count == 0

    def quantile(self, q: float) -> float | None:
        """The q-quantile, interpolated linearly inside its fine bin."""
        if self.empty:
            return None
        if q <= 0:
            return self.low
        if q >= 1:
            return self.high
        cumulative = np.cumsum(self.counts)
        target = q * self.count
        b = int(np.searchsorted(cumulative, target, side="left"))
        before = cumulative[b - 1] if b else 0
        inside = (target - before) / self.counts[b] if self.counts[b] else 0.0
        value = self.edges[b] + inside * (self.edges[b + 1] - self.edges[b])
        return float(min(max(value, self.low), self.high))

    def quantiles(self, qs: Sequence[float] = DEFAULT_QUANTILES) -> dict[float, float | None]:
        return {q: self.quantile(q) for q in qs}

    def kept_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(threshold, fraction of all rows with value >= threshold) at every fine bin edge.

        The fraction is of all rows: rows without a value (errors) are never kept by a
        threshold, as in `mlmfilter select`."""
        at_or_above = np.concatenate([np.cumsum(self.counts[::-1])[::-1], [self.at_high]])
        return self.edges, at_or_above / max(self.rows, 1)

    def kept_fraction(self, threshold: float) -> float:
        """Fraction of all rows whose value is >= ``threshold`` (exact at bin edges)."""
        edges, fraction = self.kept_curve()
        return float(np.interp(threshold, edges, fraction, left=self.count / max(self.rows, 1), right=0.0))

    def percentile_rank(self, values: np.ndarray) -> np.ndarray:
        """Fraction of valued rows below each value (0..1), NaN for NaN."""
        if self.empty:
            return np.full(len(values), np.nan)
        below = np.concatenate([[0], np.cumsum(self.counts)]) / self.count
        return np.interp(values, self.edges, below)

    def coarse(self, bins: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """The histogram in ``bins`` wider bins (FINE_BINS must be a multiple of ``bins``)."""
        group = FINE_BINS // bins
        return self.edges[::group], self.counts.reshape(bins, group).sum(axis=1)


def profile_columns(
    dataset: ds.Dataset, columns: Sequence[str], batch_rows: int | None = None
) -> dict[str, ColumnProfile]:
    """Profiles of ``columns`` in two passes over ``dataset``."""
    kwargs = {"batch_rows": batch_rows} if batch_rows else {}
    ranges = RangeCollector(columns)
    rows = scan(dataset, [ranges], columns, **kwargs)
    spans = {name: _span(ranges.low.get(name), ranges.high.get(name)) for name in columns}
    histograms = HistogramCollector({n: s for n, s in spans.items() if s is not None}, FINE_BINS)
    if histograms.ranges:
        scan(dataset, [histograms], list(histograms.ranges), **kwargs)
    profiles = {}
    for name in columns:
        count = ranges.count.get(name, 0)
        span = spans[name] or (0.0, 1.0)
        profiles[name] = ColumnProfile(
            name=name,
            rows=rows,
            count=count,
            missing=ranges.missing.get(name, 0),
            low=ranges.low.get(name),
            high=ranges.high.get(name),
            mean=ranges.total[name] / count if count else None,
            edges=np.linspace(span[0], span[1], FINE_BINS + 1),
            counts=histograms.counts.get(name, np.zeros(FINE_BINS, dtype=np.int64)),
            at_high=ranges.at_high.get(name, 0),
        )
    return profiles


def _span(low: float | None, high: float | None) -> tuple[float, float] | None:
    if low is None or high is None:
        return None
    if low == high:  # one value everywhere: give it a bin of its own
        return low - 0.5, high + 0.5
    return low, high
