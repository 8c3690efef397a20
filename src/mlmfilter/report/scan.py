"""Streaming passes over a stage's tables: every statistic the report, `inspect` and `stats` show
comes from collectors fed one arrow batch at a time. No column is ever loaded whole: collectors
keep fixed-size state (histograms, the k rows to show), so memory is set by the batch size and
the tables' size, not by how many rows the run has (docs/benchmarks.md, "Report data gathering":
a third of what loading the columns whole takes at 6M rows).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from mlmfilter.core import errors

BATCH_ROWS = 1 << 16
SHARD_ERRORS = frozenset((errors.TRUNCATED_SHARD, errors.UNREADABLE_SHARD))
# arrow's scan readahead defaults (16 batches, 4 files) hold far more decoded columns than the
# numpy work per batch needs; two of each keep the scan fed (as in selection/select.py)
BATCH_READAHEAD, FRAGMENT_READAHEAD = 2, 2
IDENTITY_COLUMNS = ("uid", "shard", "key")
ERROR_COLUMNS = ("error", "error_detail")
NOT_SCORES = frozenset((*IDENTITY_COLUMNS, *ERROR_COLUMNS, "uid_f0", "uid_f1"))
#: readout diagnostics written beside each MLM metric (probability mass, spread): not scores
AUXILIARY_SUFFIXES = ("_mass", "_std")


def numeric_columns(schema: pa.Schema) -> list[str]:
    """Score columns that hold numbers (ints, floats), in table order, diagnostics left out."""
    return [
        f.name
        for f in schema
        if f.name not in NOT_SCORES
        and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
        and not f.name.endswith(AUXILIARY_SUFFIXES)
    ]


def flag_columns(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if f.name not in NOT_SCORES and pa.types.is_boolean(f.type)]


#: a text column that says why a flag is false (``rules_failed``: "min_words,language"), shown
#: beside the scores by default
REASON_SUFFIX = "_failed"


def reason_columns(schema: pa.Schema) -> list[str]:
    """Text columns that explain a flag (``rules_failed`` beside ``rules_ok``), in table order."""
    return [f.name for f in schema if f.name not in NOT_SCORES and f.name.endswith(REASON_SUFFIX) and _is_text(f.type)]


def _is_text(dtype: pa.DataType) -> bool:
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)


def is_numeric(dtype: pa.DataType) -> bool:
    """Columns a scan reads as numbers (ints, floats, bools); the others are shown as they are."""
    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_boolean(dtype)


@dataclass
class PairRef:
    """One row of a score table: identity, the values shown beside it, its error."""

    uid: str
    shard: str
    key: str
    values: dict[str, Any]
    error: str | None = None
    error_detail: str | None = None
    note: str | None = None  # why it is shown (e.g. "itm 91 vs clip_score 12th percentile")

    @property
    def where(self) -> tuple[str, str]:
        return self.shard, self.key

    @property
    def in_shard(self) -> bool:
        """False for the rows a reader writes where a shard broke: no sample has their key."""
        return self.error not in SHARD_ERRORS


class Batch:
    """One arrow batch with its score columns as float64 numpy arrays (NaN for missing)."""

    def __init__(self, batch: pa.RecordBatch, first_row: int, value_columns: Sequence[str]):
        self.arrow = batch
        self.first_row = first_row
        names = batch.schema.names
        # numbers and flags as float arrays; any other column (text: rules_failed) is read per row
        self.values = {
            name: _as_float(batch.column(name))
            for name in value_columns
            if name in names and is_numeric(batch.schema.field(name).type)
        }
        self.flags = {name for name in self.values if pa.types.is_boolean(batch.schema.field(name).type)}
        self.num_rows = batch.num_rows

    def scalar(self, name: str, i: int) -> Any:
        return self.arrow.column(name)[i].as_py() if name in self.arrow.schema.names else None

    def ref(self, i: int, shown: Sequence[str]) -> PairRef:
        values = {}
        for name in shown:
            if name in self.values:
                value = self.values[name][i]
                values[name] = None if np.isnan(value) else (bool(value) if name in self.flags else float(value))
            elif name in self.arrow.schema.names:
                value = self.scalar(name, i)
                values[name] = value if value != "" else None  # rules_failed is "" where nothing failed
        return PairRef(
            uid=self.scalar("uid", i),
            shard=self.scalar("shard", i),
            key=self.scalar("key", i),
            values=values,
            error=self.scalar("error", i),
            error_detail=self.scalar("error_detail", i),
        )


def _as_float(column: pa.Array) -> np.ndarray:
    if pa.types.is_boolean(column.type):
        column = pc.cast(column, pa.int8())
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)


class Collector(Protocol):
    def update(self, batch: Batch) -> None: ...


def scan(
    dataset: ds.Dataset,
    collectors: Iterable[Collector],
    value_columns: Sequence[str],
    *,
    extra_columns: Sequence[str] = (),
    filter: pc.Expression | None = None,
    batch_rows: int | None = None,
) -> int:
    """One streaming pass: every collector sees every batch. Returns the rows read."""
    batch_rows = batch_rows or BATCH_ROWS
    collectors = list(collectors)
    names = set(dataset.schema.names)
    wanted = [*IDENTITY_COLUMNS, *ERROR_COLUMNS, *value_columns, *extra_columns]
    columns = [c for c in dict.fromkeys(wanted) if c in names]
    rows = 0
    batches = dataset.to_batches(
        columns=columns,
        filter=filter,
        batch_size=batch_rows,
        batch_readahead=BATCH_READAHEAD,
        fragment_readahead=FRAGMENT_READAHEAD,
    )
    for arrow_batch in batches:
        if arrow_batch.num_rows == 0:
            continue
        batch = Batch(arrow_batch, rows, value_columns)
        for collector in collectors:
            collector.update(batch)
        rows += arrow_batch.num_rows
    return rows


# -- collectors -----------------------------------------------------------------------------------


@dataclass
class RangeCollector:
    """Count, missing, min, max (and how many rows hold it) and sum of each numeric column."""

    columns: Sequence[str]
    count: dict[str, int] = field(default_factory=dict)
    at_high: dict[str, int] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)
    low: dict[str, float] = field(default_factory=dict)
    high: dict[str, float] = field(default_factory=dict)
    total: dict[str, float] = field(default_factory=dict)

    def update(self, batch: Batch) -> None:
        for name in self.columns:
            values = batch.values[name]
            valid = values[~np.isnan(values)]
            self.count[name] = self.count.get(name, 0) + len(valid)
            self.missing[name] = self.missing.get(name, 0) + len(values) - len(valid)
            self.total[name] = self.total.get(name, 0.0) + float(valid.sum())
            if len(valid):
                self.low[name] = min(self.low.get(name, np.inf), float(valid.min()))
                high = float(valid.max())
                at_high = int((valid == high).sum())
                previous = self.high.get(name, -np.inf)
                if high > previous:
                    self.high[name], self.at_high[name] = high, at_high
                elif high == previous:
                    self.at_high[name] += at_high


@dataclass
class HistogramCollector:
    """Fine fixed-width histograms over known ranges (second pass, after RangeCollector)."""

    ranges: dict[str, tuple[float, float]]
    bins: int
    counts: dict[str, np.ndarray] = field(default_factory=dict)

    def update(self, batch: Batch) -> None:
        for name, (low, high) in self.ranges.items():
            values = batch.values[name]
            counts, _ = np.histogram(values[~np.isnan(values)], bins=self.bins, range=(low, high))
            self.counts[name] = self.counts.get(name, 0) + counts


class BestRows:
    """The k rows with the highest ``priority`` across all batches; ties go to the earlier row.

    Only the k winners of each batch become PairRefs, so a pass costs numpy work, not Python
    objects per row."""

    def __init__(self, k: int, shown: Sequence[str]):
        self.k = k
        self.shown = list(shown)
        self._heap: list[tuple[tuple[float, int], int, PairRef]] = []

    def offer(self, batch: Batch, priority: np.ndarray, note: Callable[[int], str] | None = None) -> None:
        if self.k <= 0:
            return
        candidates = np.flatnonzero(~np.isnan(priority))
        if len(candidates) > self.k:
            candidates = candidates[np.argpartition(-priority[candidates], self.k - 1)[: self.k]]
        for i in candidates:
            rank = (float(priority[i]), -(batch.first_row + int(i)))
            if len(self._heap) >= self.k and rank <= self._heap[0][0]:
                continue
            ref = batch.ref(int(i), self.shown)
            if note is not None:
                ref.note = note(int(i))
            item = (rank, batch.first_row + int(i), ref)
            if len(self._heap) < self.k:
                heapq.heappush(self._heap, item)
            else:
                heapq.heapreplace(self._heap, item)

    def rows(self) -> list[PairRef]:
        """Best first."""
        return [ref for _, _, ref in sorted(self._heap, key=lambda item: item[0], reverse=True)]


class ExtremesCollector:
    """Top and bottom k rows of each column."""

    def __init__(self, columns: Sequence[str], k: int, shown: Sequence[str]):
        self.top = {name: BestRows(k, shown) for name in columns}
        self.bottom = {name: BestRows(k, shown) for name in columns}

    def update(self, batch: Batch) -> None:
        for name, best in self.top.items():
            best.offer(batch, batch.values[name])
            self.bottom[name].offer(batch, -batch.values[name])


class NearestRows:
    """The k rows of each column closest to a given threshold (the borderline pairs)."""

    def __init__(self, thresholds: dict[str, float], k: int, shown: Sequence[str]):
        self.thresholds = thresholds
        self.nearest = {name: BestRows(k, shown) for name in thresholds}

    def update(self, batch: Batch) -> None:
        for name, threshold in self.thresholds.items():
            self.nearest[name].offer(batch, -np.abs(batch.values[name] - threshold))


class DisagreementCollector:
    """For each column pair, the rows ranked highest by one and lowest by the other.

    Columns live on different scales (CLIPScore 0-100, ITM 0-100, a log-probability...), so they
    are compared as percentile ranks, from each column's exact histogram. Only rows whose ranks
    differ by more than ``min_gap`` count as disagreeing: in a small or unanimous run a gallery
    of near-ties would claim disagreements that are not there."""

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        percentile: dict[str, Callable[[np.ndarray], np.ndarray]],
        k: int,
        shown: Sequence[str],
        min_gap: float = 0.25,
    ):
        self.pairs = list(pairs)
        self.min_gap = min_gap
        self.percentile = percentile
        self.first_higher = {pair: BestRows(k, shown) for pair in self.pairs}
        self.second_higher = {pair: BestRows(k, shown) for pair in self.pairs}

    def update(self, batch: Batch) -> None:
        ranks = {}
        for a, b in self.pairs:
            for name in (a, b):
                if name not in ranks:
                    ranks[name] = self.percentile[name](batch.values[name])
            gap = ranks[a] - ranks[b]

            def note(i: int, a=a, b=b) -> str:
                return f"{a} at {ranks[a][i]:.0%}, {b} at {ranks[b][i]:.0%} (percentile ranks)"

            self.first_higher[(a, b)].offer(batch, np.where(gap > self.min_gap, gap, np.nan), note)
            self.second_higher[(a, b)].offer(batch, np.where(-gap > self.min_gap, -gap, np.nan), note)


class ReservoirCollector:
    """A uniform random sample of rows (their numeric values), for scatter plots; seeded."""

    def __init__(self, columns: Sequence[str], size: int, seed: int = 0):
        self.columns = list(columns)
        self.size = size
        self._rng = np.random.default_rng(seed)
        self._keys = np.empty(0)
        self._values = {name: np.empty(0) for name in self.columns}

    def update(self, batch: Batch) -> None:
        keys = np.concatenate([self._keys, self._rng.random(batch.num_rows)])
        values = {name: np.concatenate([self._values[name], batch.values[name]]) for name in self.columns}
        if len(keys) > self.size:
            keep = np.argpartition(keys, self.size - 1)[: self.size]
            keys = keys[keep]
            values = {name: v[keep] for name, v in values.items()}
        self._keys, self._values = keys, values

    def values(self) -> dict[str, np.ndarray]:
        return self._values


class ErrorCollector:
    """Rows per error reason, with the first few examples of each."""

    def __init__(self, examples: int, shown: Sequence[str]):
        self.examples_per_reason = examples
        self.shown = list(shown)
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[PairRef]] = {}

    def update(self, batch: Batch) -> None:
        if "error" not in batch.arrow.schema.names:
            return
        column = batch.arrow.column("error")
        if column.null_count == len(column):
            return
        for entry in pc.value_counts(column.drop_null()).to_pylist():
            reason = entry["values"]
            self.counts[reason] = self.counts.get(reason, 0) + entry["counts"]
            kept = self.examples.setdefault(reason, [])
            if len(kept) < self.examples_per_reason:
                rows = np.flatnonzero(pc.fill_null(pc.equal(column, reason), False).to_numpy(zero_copy_only=False))
                kept.extend(batch.ref(int(i), self.shown) for i in rows[: self.examples_per_reason - len(kept)])


class FlagCollector:
    """True / false / missing counts of boolean columns, with the first few false rows."""

    def __init__(self, columns: Sequence[str], examples: int, shown: Sequence[str]):
        self.columns = list(columns)
        self.examples_per_flag = examples
        self.shown = list(shown)
        self.counts = {name: {"true": 0, "false": 0, "missing": 0} for name in self.columns}
        self.false_examples: dict[str, list[PairRef]] = {name: [] for name in self.columns}

    def update(self, batch: Batch) -> None:
        for name in self.columns:
            values = batch.values[name]
            missing = np.isnan(values)
            false = ~missing & (values == 0)
            self.counts[name]["missing"] += int(missing.sum())
            self.counts[name]["false"] += int(false.sum())
            self.counts[name]["true"] += int((~missing & (values != 0)).sum())
            room = self.examples_per_flag - len(self.false_examples[name])
            for i in np.flatnonzero(false)[: max(room, 0)]:
                self.false_examples[name].append(batch.ref(int(i), self.shown))


class MatchCollector:
    """The first ``limit`` rows (of a filtered scan) and how many matched in all."""

    def __init__(self, limit: int, shown: Sequence[str]):
        self.limit = limit
        self.shown = list(shown)
        self.rows: list[PairRef] = []
        self.matched = 0

    def update(self, batch: Batch) -> None:
        self.matched += batch.num_rows
        for i in range(min(batch.num_rows, self.limit - len(self.rows))):
            self.rows.append(batch.ref(i, self.shown))


class ReasonCollector:
    """How often each reason appears in the text columns that explain a flag (``rules_failed``:
    comma-separated rule names), so the report says which rule failed how often."""

    def __init__(self, columns: Sequence[str]):
        self.counts: dict[str, dict[str, int]] = {name: {} for name in columns}

    def update(self, batch: Batch) -> None:
        for name, counts in self.counts.items():
            column = batch.arrow.column(name)
            items = pc.list_flatten(pc.split_pattern(column.drop_null(), ","))
            for entry in pc.value_counts(items).to_pylist():
                if entry["values"]:
                    counts[entry["values"]] = counts.get(entry["values"], 0) + entry["counts"]

    def for_flag(self, flag: str) -> dict[str, int]:
        """The reasons of the flag's scorer (rules_ok -> rules_failed), most frequent first."""
        prefix = flag.rsplit("_", 1)[0]
        counts = self.counts.get(prefix + REASON_SUFFIX, {})
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
