"""Several runs as one pool: their score tables joined on uid, streamed batch by batch.

``mlmfilter select RUN1 RUN2 ...`` selects over columns of several runs (rules in one, CLIP in
another, the MLM judge in a third, possibly over different but overlapping inputs). The rules:

* **The first run drives.** Its tables are streamed in their fixed order (the top-k needs the
  same order on every pass); each batch's uids are looked up in the other runs, whose needed
  columns are held in memory as arrow arrays aligned to their sorted uid halves (16 bytes a uid
  plus the columns the selection reads, never whole tables, never pandas). ``uid``, ``shard``
  and ``key`` come from the first run, so ``reshard`` reads the first run's shards.
* **The pool is the union of the runs' uids**: the first run's rows plus the uids only other
  runs hold. A fraction is of that pool. A row passes only when its uid is in *every* run;
  pool rows missing from a run are counted per run (``missing`` in selection.json).
* **Stages of one run** (``--stage score,judge``) are joined the same way; a column two stages
  hold keeps its plain name in the first stage named and is ``stage.column`` in the later ones.
* **Column names**: ``uid``, ``uid_f0``/``uid_f1``, ``shard``, ``key`` (from the first run),
  ``error``/``error_detail`` (the first run's error, else the next run's that has one: a pair
  that failed anywhere shows why) and ``skipped`` (skipped in any run) are shared. Every other
  column must be unique across the runs: a clash is refused, naming the column and the runs.
  A run given as ``NAME=PATH`` exposes its columns as ``NAME_column`` (``b32_clip_score``).
* **Duplicate uids**: in the first run every row stays a row (as with one run); in another run
  the first row of a uid (shard order) is the one joined, and the repeats are counted.
* **Counts**: ``errors`` count the first run's rows (with the merged error); uids only other runs
  hold are in ``read`` (the pool) and in ``missing``, but their errors are not tallied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from mlmfilter.io.uid import HALVES_DTYPE
from mlmfilter.selection.subset import UidIndex, unique_sorted_halves

#: columns every run has, merged by a fixed rule instead of refused as a clash
SHARED_COLUMNS = ("uid", "uid_f0", "uid_f1", "shard", "key", "error", "error_detail", "skipped")
#: true where the row's uid is in every run; the selection ANDs it into its verdicts
PRESENT_COLUMN = "__in_every_run"
_NULL_UID = "0" * 32
LOOKUP_CACHE_ROWS = 400_000_000  # ~2 GB of cached positions at most


@dataclass
class JoinStats:
    """What one full pass over the first run saw; the same on every pass."""

    rows: int = 0  # rows of the first run
    in_every_run: int = 0
    missing: list[int] = field(default_factory=list)  # per run: rows of the first run it lacks


class JoinedTables:
    """The runs' tables as the selection sees one run's (same members as ``ScoreTables``)."""

    def __init__(self, tables: Sequence[Any], names: Sequence[str | None], *, stages: Sequence[str] | None = None):
        """``stages``: the parts are stages of one run (their names, in order): a column keeps its
        plain name in the first stage that has it and is ``stage.column`` in the later ones,
        instead of a clash being refused."""
        self.parts = list(tables)
        self.names = list(names)
        self.stages = list(stages) if stages is not None else None
        first = self.parts[0]
        self.run_dir = first.run_dir
        self.files = [f for part in self.parts for f in part.files]
        self.completeness = first.completeness
        self.batch_rows = first.batch_rows
        self.uid_columns = first.uid_columns
        self.presence = pc.field(PRESENT_COLUMN)
        # exposed column name -> (run index, column name in that run)
        self.sources: dict[str, tuple[int, str]] = {}
        fields: dict[str, pa.Field] = {}
        for index, part in enumerate(self.parts):
            for f in part.schema:
                if f.name in SHARED_COLUMNS:
                    if index == 0 or f.name in ("error", "error_detail", "skipped"):
                        fields.setdefault(f.name, f)
                    continue
                exposed = f"{self.names[index]}_{f.name}" if self.names[index] else f.name
                if exposed in self.sources and self.stages is not None:
                    exposed = qualified_name(self.stages[index], f.name)
                if exposed in self.sources:
                    other = self.sources[exposed][0]
                    raise ValueError(_clash_message(exposed, self.label(other), self.label(index)))
                self.sources[exposed] = (index, f.name)
                fields[exposed] = f.with_name(exposed)
        self.schema = pa.schema(list(fields.values()))
        self.columns = {f.name: f.type for f in self.schema}
        self.others = [_IndexedRun(part) for part in self.parts[1:]]
        self.stats = JoinStats()
        # The lookups are the same on every pass (the top-k reads the first run 3-5 times): kept
        # after the first pass when they fit LOOKUP_CACHE_ROWS (5 bytes a row and other run).
        self._cache_lookups = bool(self.others) and first.dataset.count_rows() * len(self.others) <= LOOKUP_CACHE_ROWS
        self._lookups: list | None = None

    def label(self, index: int) -> str:
        if self.stages is not None:
            return f"stage {self.stages[index]}"
        name = self.names[index]
        part = self.parts[index]
        label = f"{name}={part.run_dir}" if name else str(part.run_dir)
        if sum(str(p.run_dir) == str(part.run_dir) for p in self.parts) > 1:  # stages of one run joined
            label += f" (stage {getattr(part, 'stage', '?')})"
        return label

    # -- streaming ------------------------------------------------------------------------------

    def batches(self, projection: dict[str, pc.Expression], reads: Sequence[str]) -> Iterator[pa.RecordBatch]:
        """Joined batches of the first run's rows, projected: ``reads`` names the base columns
        the projection's expressions use."""
        wanted = list(dict.fromkeys([*reads, *(n for n in projection if n in self.columns)]))
        if "error_detail" in wanted and "error" in self.columns:
            wanted.append("error")  # the detail follows the run whose error is shown
        first = self.parts[0]
        # exposed name -> the first run's own name (they differ when the first run is named)
        own = {n: self.sources[n][1] for n in wanted if n in self.sources and self.sources[n][0] == 0}
        own.update({n: n for n in (*self.uid_columns, *wanted) if n in SHARED_COLUMNS and n in first.columns})
        stats = JoinStats(missing=[0] * len(self.parts))
        cached = self._lookups
        filling: list | None = [] if cached is None and self._cache_lookups else None
        for number, batch in enumerate(first.batches({exposed: pc.field(name) for exposed, name in own.items()})):
            arrays = {name: batch.column(name) for name in own}
            present = np.ones(batch.num_rows, dtype=bool)
            if cached is not None and number < len(cached) and len(cached[number][0][0]) == batch.num_rows:
                lookups = cached[number]  # every pass reads the rows in the same order
            else:
                lookups = self._lookup(batch)
            if filling is not None:
                filling.append(lookups)
            for index, (other, (found, position)) in enumerate(zip(self.others, lookups), start=1):
                stats.missing[index] += int((~found).sum())
                present &= found
                take = pa.array(position, mask=~found)
                for name in wanted:
                    if name in self.sources and self.sources[name][0] == index:
                        arrays[name] = other.column(self.sources[name][1]).take(take)
                self._merge_shared(arrays, other, take, wanted)
            stats.rows += batch.num_rows
            stats.in_every_run += int(present.sum())
            arrays[PRESENT_COLUMN] = pa.array(present)
            joined = pa.RecordBatch.from_pydict(arrays)
            yield from ds.dataset(joined).to_batches(columns=projection)
        self.stats = stats
        if filling is not None:
            self._lookups = filling

    def _lookup(self, batch: pa.RecordBatch) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per other run: which rows of this batch of the first run it holds, and where."""
        halves, valid = self._halves(batch)
        out = []
        for other in self.others:
            found, position = other.locate(halves)
            found &= valid
            other.seen[position[found]] = True
            out.append((found, position.astype(np.int32) if len(other.index) < 2**31 else position))
        return out

    def rows_only_in_other_runs(self) -> tuple[int, list[int]]:
        """After a full pass: the uids only other runs hold (they join the pool, never pass)
        and, per run, how many of them it lacks. Counted once across the other runs."""
        unseen = [other.unseen() for other in self.others]
        if not any(len(u) for u in unseen):
            return 0, [0] * len(self.parts)
        extra = unique_sorted_halves(np.concatenate(unseen))
        missing = [len(extra)] + [int((~other.locate(extra)[0]).sum()) for other in self.others]
        return len(extra), missing

    def uid_halves(self, batch: pa.RecordBatch, rows: np.ndarray | None = None) -> np.ndarray:
        return self.parts[0].uid_halves(batch, rows)

    def runs_json(self) -> list[dict[str, Any]]:
        return [
            {
                "run_dir": str(part.run_dir),
                "name": self.names[index],
                **({"stage": self.stages[index]} if self.stages is not None else {}),
                "columns": sorted(n for n, (i, _) in self.sources.items() if i == index),
                "completeness": part.completeness.to_json(),
                "score_files": len(part.files),
                "duplicate_uids": 0 if index == 0 else self.others[index - 1].duplicates,
            }
            for index, part in enumerate(self.parts)
        ]

    # -- internals ------------------------------------------------------------------------------

    def _halves(self, batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
        """The first run's uid halves; a row without a uid (never written by mlmfilter, possible
        in imported tables) is matched nowhere."""
        valid = np.ones(batch.num_rows, dtype=bool)
        if self.uid_columns == ("uid",) and batch.column("uid").null_count:
            uids = batch.column("uid")
            valid = uids.is_valid().to_numpy(zero_copy_only=False)
            batch = batch.set_column(batch.schema.get_field_index("uid"), "uid", uids.fill_null(_NULL_UID))
        return self.parts[0].uid_halves(batch), valid

    def _merge_shared(
        self, arrays: dict[str, pa.Array], other: "_IndexedRun", take: pa.Array, wanted: list[str]
    ) -> None:
        """error / error_detail / skipped of another run folded in (only those this pass reads)."""
        if "error" in other.tables.columns and ("error" in wanted or "error_detail" in wanted):
            theirs = other.column("error").take(take)
            if "error" not in arrays:
                arrays["error"] = theirs
                if "error_detail" in other.tables.columns and "error_detail" in wanted:
                    arrays["error_detail"] = other.column("error_detail").take(take)
            else:
                use_theirs = pc.and_(pc.is_null(arrays["error"]), pc.is_valid(theirs))
                if "error_detail" in other.tables.columns and "error_detail" in arrays and "error_detail" in wanted:
                    detail = other.column("error_detail").take(take)
                    arrays["error_detail"] = pc.if_else(use_theirs, detail, arrays["error_detail"])
                arrays["error"] = pc.if_else(use_theirs, theirs, arrays["error"])
        if "skipped" in other.tables.columns and "skipped" in wanted:
            theirs = other.column("skipped").take(take).fill_null(False)
            arrays["skipped"] = pc.or_(arrays["skipped"].fill_null(False), theirs) if "skipped" in arrays else theirs


class _IndexedRun:
    """A run other than the first: its unique uids sorted, and columns read on demand, aligned."""

    def __init__(self, tables: Any):
        self.tables = tables
        uid_columns = list(tables.uid_columns)
        parts, valid_rows, offset = [], [], 0
        for batch in tables.batches({n: pc.field(n) for n in uid_columns}):
            rows = np.arange(offset, offset + batch.num_rows)
            offset += batch.num_rows
            if uid_columns == ["uid"] and batch.column("uid").null_count:  # a row without a uid joins nothing
                keep = batch.column("uid").is_valid()
                batch, rows = batch.filter(keep), rows[keep.to_numpy(zero_copy_only=False)]
            parts.append(tables.uid_halves(batch))
            valid_rows.append(rows)
        halves = np.concatenate(parts) if parts else np.zeros(0, dtype=HALVES_DTYPE)
        del parts
        rows = np.concatenate(valid_rows) if valid_rows else np.zeros(0, dtype=np.int64)
        # temporaries are dropped as soon as they are used: the peak is ~50 bytes a row, what
        # stays is 16 (uid halves) + 4 (row number) + 1 (seen) + the columns read
        order = _argsort_halves(halves)
        f0, f1 = halves["f0"][order], halves["f1"][order]
        del halves
        first = np.ones(len(order), dtype=bool)
        first[1:] = (f0[1:] != f0[:-1]) | (f1[1:] != f1[:-1])
        self.index = UidIndex.from_halves(f0[first], f1[first])  # sorted, unique
        del f0, f1
        row_type = np.int32 if len(rows) and rows.max() < 2**31 else np.int64
        self.rows = rows[order[first]].astype(row_type)  # table row of each key: its first occurrence (stable sort)
        self.duplicates = int(len(order) - len(self.index))
        del order, first, rows
        self.seen = np.zeros(len(self.index), dtype=bool)
        self._columns: dict[str, pa.Array] = {}

    @property
    def keys(self) -> np.ndarray:
        return self.index.keys

    def unseen(self) -> np.ndarray:
        """The uids no row of the first run matched, as sorted halves."""
        out = np.empty(int((~self.seen).sum()), dtype=HALVES_DTYPE)
        out["f0"], out["f1"] = self.index.f0[~self.seen], self.index.f1[~self.seen]
        return out

    def locate(self, halves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.index.locate(halves)

    def column(self, name: str) -> pa.Array:
        """One column of this run, its values in key order (read in one ordered scan, once)."""
        if name not in self._columns:
            chunks = [b.column(name) for b in self.tables.batches({name: pc.field(name)})]
            values = pa.chunked_array(chunks, type=self.tables.columns[name]).combine_chunks()
            self._columns[name] = values.take(pa.array(self.rows))
        return self._columns[name]


def _argsort_halves(halves: np.ndarray) -> np.ndarray:
    """Order by (f0, f1, row): by f0 first (a plain, unstable argsort: fast), then the rare runs
    of equal f0 by f1 and the row number, so a repeated uid's first row comes first."""
    order = np.argsort(halves["f0"])
    f0 = halves["f0"][order]
    same = f0[1:] == f0[:-1]
    if same.any():
        in_run = np.zeros(len(order), dtype=bool)
        in_run[1:] |= same
        in_run[:-1] |= same
        run_rows = order[in_run]
        order[in_run] = run_rows[np.lexsort((run_rows, halves["f1"][run_rows], halves["f0"][run_rows]))]
    return order


def qualified_name(stage: str, column: str) -> str:
    """A column of a later stage of one run that an earlier stage has too: ``judge.rules_ok``
    (expressions read it as written)."""
    return f"{stage}.{column}"


def _clash_message(column: str, first: str, second: str) -> str:
    return (
        f"column {column!r} is in two runs ({first} and {second}): name the runs to tell them apart, "
        f"e.g. `mlmfilter select a=RUN1 b=RUN2 ...`, then write a_{column} and b_{column} (a named run's columns "
        "get its name as prefix)"
    )


def parse_run_arguments(arguments: Sequence[str]) -> list[str | tuple[str, str]]:
    """Command-line run arguments: ``PATH`` or ``NAME=PATH`` (an existing path is always taken
    as it is, so a folder named ``a=b`` still works). An argument that is no path and reads
    like an expression is refused with the flag it belongs to."""
    import os

    runs: list[str | tuple[str, str]] = []
    for argument in arguments:
        name, equals, path = argument.partition("=")
        if "://" in argument or os.path.exists(argument):
            runs.append(argument)
        elif equals and name.isidentifier() and path:
            runs.append((name, path))
        elif any(mark in argument for mark in "<>=! ") or argument in ("True", "False"):
            raise ValueError(f"{argument!r} is not a run folder; give the expression with --where {argument!r}")
        else:
            runs.append(argument)
    return runs
