"""The distribution of each score column from streaming passes: range, a fine histogram, then
the exact values and counts the tables print.

The fine histogram (``FINE_BINS`` equal bins between min and max) draws the plots and the kept
curve (exact at every bin edge) and gives percentile ranks. What a user reads as a number is
counted, not interpolated, whatever the run's size and however many values tie:

- the q-quantile is the ceil(q n)-th smallest value (a value of the column): a further pass keeps
  only the values of the fine bin that holds it (at most ``EXACT_BIN_ROWS``; a fuller bin is split
  into finer bins by one more pass, until it fits or holds one value);
- "kept at >= v" for those values, and for any threshold asked for up front (the selection's
  cut), is the count of rows with a value >= v, so ties at v are all counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Mapping, Sequence

import numpy as np
import pyarrow.dataset as ds

from mlmfilter.report.scan import HistogramCollector, RangeCollector, scan

FINE_BINS = 4096
#: values of one fine bin held in memory to find an order statistic in it (8 bytes each); a bin
#: holding more (heavy ties, a skewed column) is split by one more pass instead
EXACT_BIN_ROWS = 1 << 18
#: splits of a bin before its values are taken whatever their number (only values a few ulps apart get here)
MAX_SPLITS = 6
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
    exact_quantiles: dict[float, float] = field(default_factory=dict)  # q -> the ceil(q n)-th smallest value
    kept_at: dict[float, int] = field(default_factory=dict)  # threshold -> rows with a value >= it (counted)

    @property
    def empty(self) -> bool:
        return self.count == 0

    def quantile(self, q: float) -> float | None:
        """The q-quantile: the ceil(q n)-th smallest value when it was counted (every q of
        ``profile_columns``), else interpolated linearly inside its fine bin."""
        if self.empty:
            return None
        if q <= 0:
            return self.low
        if q >= 1:
            return self.high
        if q in self.exact_quantiles:
            return self.exact_quantiles[q]
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

    def kept_count(self, threshold: float) -> int | None:
        """Rows whose value is >= ``threshold``, when it was counted (quantiles, asked thresholds,
        min and max); None otherwise."""
        if threshold in self.kept_at:
            return self.kept_at[threshold]
        if self.empty or threshold > self.high:
            return 0
        if threshold <= self.low:
            return self.count
        if threshold == self.high:
            return self.at_high
        return None

    def kept_fraction(self, threshold: float) -> float:
        """Fraction of all rows whose value is >= ``threshold``: counted for the quantiles and the
        thresholds ``profile_columns`` was given, else interpolated between bin edges (exact there)."""
        counted = self.kept_count(threshold)
        if counted is not None:
            return counted / max(self.rows, 1)
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
    dataset: ds.Dataset,
    columns: Sequence[str],
    batch_rows: int | None = None,
    *,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    thresholds: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, ColumnProfile]:
    """Profiles of ``columns``: range and histogram in two passes over ``dataset``, then (usually
    one more pass) the exact ``quantiles`` and the rows at or above them and each of ``thresholds``."""
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
    _count_exactly(dataset, profiles, quantiles, thresholds or {}, kwargs)
    return profiles


def _span(low: float | None, high: float | None) -> tuple[float, float] | None:
    if low is None or high is None:
        return None
    if low == high:  # one value everywhere: give it a bin of its own
        return low - 0.5, high + 0.5
    return low, high


# -- exact order statistics and counts ---------------------------------------------------------


@dataclass
class _Window:
    """Where an order statistic lies: the values v with lo <= v < hi (<= hi when ``closed``)."""

    lo: float
    hi: float
    closed: bool
    below: int  # valued rows under lo
    inside: int  # valued rows in the window
    ranks: list[int]  # 1-based ranks among the valued rows that lie here
    splits: int = 0

    def holds(self, values: np.ndarray) -> np.ndarray:
        upper = values <= self.hi if self.closed else values < self.hi
        return (values >= self.lo) & upper


class _ColumnCount:
    """One column's pending windows and thresholds, and what each pass found."""

    def __init__(self, profile: ColumnProfile, quantiles: Sequence[float], thresholds: Sequence[float]):
        self.profile = profile
        self.ranks = {q: _rank(q, profile.count) for q in quantiles if 0 < q < 1}
        cumulative = np.cumsum(profile.counts)
        windows: dict[int, _Window] = {}
        for rank in sorted(set(self.ranks.values())):
            b = int(np.searchsorted(cumulative, rank, side="left"))
            if b not in windows:
                below = int(cumulative[b - 1]) if b else 0
                windows[b] = _Window(
                    float(profile.edges[b]),
                    float(profile.edges[b + 1]),
                    b == FINE_BINS - 1,
                    below,
                    int(profile.counts[b]),
                    [],
                )
            windows[b].ranks.append(rank)
        self.windows = list(windows.values())
        self.values_at_rank: dict[int, float] = {}
        # a threshold inside the range: rows at or above its bin's lower edge, less those of the bin under it
        self.thresholds: dict[float, tuple[float, float, bool, int]] = {}
        self.under: dict[float, int] = {}
        at_or_above = np.concatenate([np.cumsum(profile.counts[::-1])[::-1], [profile.at_high]])
        for t in thresholds:
            if profile.empty or not profile.low < t < profile.high or t in self.thresholds:
                continue
            b = min(int(np.searchsorted(profile.edges, t, side="right")) - 1, FINE_BINS - 1)
            self.thresholds[t] = (float(profile.edges[b]), t, False, int(at_or_above[b]))
            self.under[t] = 0
        self._kept: dict[int, list[np.ndarray]] = {}
        self._split: dict[int, tuple[np.ndarray, float, float]] = {}

    @property
    def pending(self) -> bool:
        return bool(self.windows or self.thresholds)

    def update(self, values: np.ndarray) -> None:
        values = values[~np.isnan(values)]
        for t, (lo, hi, _, _) in self.thresholds.items():
            self.under[t] += int(((values >= lo) & (values < hi)).sum())
        for i, window in enumerate(self.windows):
            inside = values[window.holds(values)]
            if not len(inside):
                continue
            if window.inside <= EXACT_BIN_ROWS or window.splits >= MAX_SPLITS:
                self._kept.setdefault(i, []).append(inside)
            else:
                counts, _ = np.histogram(inside, bins=FINE_BINS, range=(window.lo, window.hi))
                previous = self._split.get(i)
                low, high = float(inside.min()), float(inside.max())
                if previous is not None:
                    counts, low, high = counts + previous[0], min(low, previous[1]), max(high, previous[2])
                self._split[i] = (counts, low, high)

    def finish_pass(self) -> None:
        """Resolve what this pass collected; split the windows that were too full."""
        for t, (_, _, _, at_or_above_bin) in self.thresholds.items():
            self.profile.kept_at[t] = at_or_above_bin - self.under[t]
        self.thresholds = {}
        remaining = []
        for i, window in enumerate(self.windows):
            if i in self._split:
                remaining += self._refine(window, *self._split[i])
                continue
            ordered = np.sort(np.concatenate(self._kept.get(i, [np.empty(0)])))
            for rank in window.ranks:
                value = float(ordered[rank - window.below - 1])
                first = int(np.searchsorted(ordered, value, side="left"))
                self._resolve(rank, value, self.profile.count - window.below - first)
        self.windows = remaining
        self._kept, self._split = {}, {}
        if not self.pending:
            for q, rank in self.ranks.items():
                self.profile.exact_quantiles[q] = self.values_at_rank[rank]

    def _refine(self, window: _Window, counts: np.ndarray, low: float, high: float) -> list[_Window]:
        if low == high:  # every value of the window is the same: that is the order statistic
            for rank in window.ranks:
                self._resolve(rank, low, self.profile.count - window.below)
            return []
        edges = np.linspace(window.lo, window.hi, FINE_BINS + 1)
        cumulative = np.cumsum(counts)
        out: dict[int, _Window] = {}
        for rank in window.ranks:
            b = int(np.searchsorted(cumulative, rank - window.below, side="left"))
            if b not in out:
                below = window.below + (int(cumulative[b - 1]) if b else 0)
                closed = window.closed and b == FINE_BINS - 1
                out[b] = _Window(
                    float(edges[b]), float(edges[b + 1]), closed, below, int(counts[b]), [], window.splits + 1
                )
            out[b].ranks.append(rank)
        return list(out.values())

    def _resolve(self, rank: int, value: float, at_or_above: int) -> None:
        self.values_at_rank[rank] = value
        self.profile.kept_at[value] = at_or_above


def _rank(q: float, count: int) -> int:
    """ceil(q n), computed on the decimal q (0.1 * 30 is 3, not 3.0000000000000004)."""
    return min(max(math.ceil(Fraction(repr(float(q))) * count), 1), count)


def _count_exactly(
    dataset: ds.Dataset,
    profiles: dict[str, ColumnProfile],
    quantiles: Sequence[float],
    thresholds: Mapping[str, Sequence[float]],
    scan_options: dict,
) -> None:
    """Passes over ``dataset`` until every quantile and threshold of every column is counted
    (one pass unless a bin holds more than EXACT_BIN_ROWS values)."""
    counts = {
        name: _ColumnCount(profile, quantiles, thresholds.get(name, ()))
        for name, profile in profiles.items()
        if not profile.empty
    }
    while True:
        pending = {name: c for name, c in counts.items() if c.pending}
        if not pending:
            return
        scan(dataset, [_CountCollector(pending)], list(pending), **scan_options)
        for column in pending.values():
            column.finish_pass()


@dataclass
class _CountCollector:
    columns: dict[str, _ColumnCount]

    def update(self, batch) -> None:
        for name, column in self.columns.items():
            column.update(batch.values[name])
