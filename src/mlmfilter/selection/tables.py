"""A run's score tables as the selection streams them (:class:`ScoreTables`); several runs joined
on uid present the same members (:class:`mlmfilter.selection.join.JoinedTables`).

Score files may identify rows by a ``uid`` string column (32 hex chars) or by two uint64
columns ``uid_f0``/``uid_f1`` (its halves), which large synthetic tables use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlmfilter.core.locations import as_path
from mlmfilter.io.uid import HALVES_DTYPE, uids_to_halves
from mlmfilter.runs.read import RunReader

UID_COLUMN, UID_HALF_COLUMNS = "uid", ("uid_f0", "uid_f1")
BATCH_ROWS = 1 << 18
#: the stage selected from unless one is named: the folder `mlmfilter score` writes by default
DEFAULT_STAGE = "score"
# Scan readahead: arrow's defaults (16 batches, 4 files) hold hundreds of MB of decoded columns
# for big row groups and buy no speed here, where numpy work per batch dominates.
BATCH_READAHEAD, FRAGMENT_READAHEAD = 2, 2


class SelectionError(ValueError):
    """The selection cannot run as asked: no score files, an unknown column, a bad fraction."""


class ScoreTables:
    """A run's score tables (completed shards) as one arrow dataset, streamed in a fixed order."""

    def __init__(self, run_dir: str | Path, batch_rows: int = BATCH_ROWS, stage: str = DEFAULT_STAGE):
        try:
            self.run = RunReader(run_dir)
            self.files = self.run.table_files(stage)
        except ValueError as exc:  # not a run, no such stage
            raise SelectionError(str(exc)) from None
        self.run_dir: Path | str = as_path(self.run.url)
        self.stage = stage
        if not self.files:
            raise SelectionError(f"stage {stage!r} of {self.run.url} has no completed shard to select from")
        self.completeness = self.run.completeness(stage)
        self.dataset = self.run.dataset(stage)
        self.schema = self.dataset.schema
        self.batch_rows = batch_rows
        self.columns = {f.name: f.type for f in self.schema}
        if UID_COLUMN in self.columns:
            self.uid_columns: tuple[str, ...] = (UID_COLUMN,)
        elif all(c in self.columns for c in UID_HALF_COLUMNS):
            self.uid_columns = UID_HALF_COLUMNS
        else:
            raise SelectionError(
                f"the score files have no {UID_COLUMN!r} column (nor {' and '.join(UID_HALF_COLUMNS)})"
            )
        self.presence: pc.Expression | None = None  # one run: every row is in it

    def batches(self, projection: dict[str, pc.Expression], reads: Sequence[str] = ()) -> Iterator[pa.RecordBatch]:
        # ordered scan: every pass sees the rows in the same order, which the top-k relies on
        yield from self.dataset.to_batches(
            columns=projection,
            batch_size=self.batch_rows,
            batch_readahead=BATCH_READAHEAD,
            fragment_readahead=FRAGMENT_READAHEAD,
        )

    def uid_halves(self, batch: pa.RecordBatch, rows: np.ndarray | None = None) -> np.ndarray:
        if self.uid_columns == (UID_COLUMN,):
            uids = batch.column(UID_COLUMN)
            return uids_to_halves(uids if rows is None else uids.take(rows))
        f0, f1 = (batch.column(name).to_numpy(zero_copy_only=False) for name in UID_HALF_COLUMNS)
        out = np.empty(len(f0) if rows is None else len(rows), dtype=HALVES_DTYPE)
        out["f0"], out["f1"] = (f0, f1) if rows is None else (f0[rows], f1[rows])
        return out
