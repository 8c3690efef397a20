"""Several stages of one run read as one table: a cascade looked at and selected from as a whole.

A cascade writes its scores into stages of one run folder (``score`` with the cheap filters, then
``score --stage judge --only '...'`` with the judge). Every reading command (``select``, ``stats``,
``inspect``, ``report``) takes the stages to read:

* ``--stage judge``: one stage, its columns as they are;
* ``--stage score,judge``: those stages joined on ``uid`` (as ``select`` joins runs, see
  :mod:`mlmfilter.selection.join`): the first stage named drives (its rows, shards and keys), a
  column keeps its plain name in the first stage that has it and is ``stage.column`` in a later
  one that has it too (``judge.rules_ok``; expressions read it as written); ``error`` is the
  first error any stage recorded and ``skipped`` is true where a stage skipped the pair;
* ``--stage all``: every scoring stage with completed shards, ``score`` first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from mlmfilter.runs.read import RunReader
from mlmfilter.selection.join import JoinedTables
from mlmfilter.selection.tables import BATCH_ROWS, DEFAULT_STAGE, ScoreTables, SelectionError

ALL_STAGES = "all"
#: the kinds of stage whose tables hold scores (``mlmfilter score`` and imported score dumps)
SCORE_KINDS = ("score", "imported")


def stage_names(spec: str | Sequence[str] | None) -> list[str] | None:
    """``"score,judge"`` or ``["score", "judge"]`` -> the names; None for every scoring stage
    (``"all"`` or nothing given)."""
    if spec is None:
        return None
    given = [spec] if isinstance(spec, str) else list(spec)
    names = [name.strip() for item in given for name in item.split(",") if name.strip()]
    if not names or names == [ALL_STAGES]:
        return None
    if ALL_STAGES in names:
        raise SelectionError(f"--stage {ALL_STAGES} reads every scoring stage: give it alone, or name the stages")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SelectionError(f"stage {repeated[0]!r} is named twice in --stage")
    return names


def resolve_stages(run: RunReader, spec: str | Sequence[str] | None, first: Sequence[str] = ()) -> list[str]:
    """The stages to read, in order. Named stages must exist; ``all`` (or None) is every scoring
    stage with a completed shard: ``first`` (e.g. the stages a selection read, in its order), then
    ``score``, then the others by name."""
    names = stage_names(spec)
    known = run.stages()
    if names is not None:
        for name in names:
            if name not in known:
                raise SelectionError(
                    f"{run.url} has no stage {name!r} (stages: {', '.join(known) or 'none'}); "
                    f"--stage takes a stage, several joined with ',' (score,judge) or {ALL_STAGES}"
                )
        return names
    scoring = [s for s in known if _kind(run, s) in SCORE_KINDS and run.table_files(s)]
    order = [*[s for s in first if s in scoring], *([DEFAULT_STAGE] if DEFAULT_STAGE in scoring else [])]
    order += sorted(s for s in scoring if s not in order)
    out = list(dict.fromkeys(order))
    if not out:
        raise SelectionError(
            f"{run.url} has no scoring stage with a completed shard (stages: {', '.join(known) or 'none'})"
        )
    return out


def _kind(run: RunReader, stage: str) -> str | None:
    try:
        return run.settings(stage).get("kind")
    except (OSError, ValueError):
        return None


def stage_tables(
    run_dir: str | Path, stages: Sequence[str], batch_rows: int = BATCH_ROWS
) -> ScoreTables | JoinedTables:
    """One stage's tables, or several stages of the run joined on uid (qualified names on clash)."""
    parts = [ScoreTables(run_dir, batch_rows, stage) for stage in stages]
    if len(parts) == 1:
        return parts[0]
    return JoinedTables(parts, [None] * len(parts), stages=list(stages))


class JoinedStages:
    """Several stages of a run as the report's streaming passes read a dataset: ``schema``,
    ``to_batches(columns=, filter=)``, ``count_rows()``. The rows are the first stage's; the
    other stages' columns are looked up by uid (held in memory as arrow arrays, only those read)."""

    def __init__(self, tables: JoinedTables):
        self.tables = tables
        self.schema = tables.schema

    def count_rows(self) -> int:
        return self.tables.parts[0].dataset.count_rows()

    def to_batches(
        self, columns: Sequence[str] | None = None, filter: pc.Expression | None = None, **_: Any
    ) -> Iterator[pa.RecordBatch]:
        """``filter`` may read only ``columns`` (the scans name the expression's columns)."""
        names = list(columns or self.schema.names)
        projection = {name: pc.field(name) for name in names}
        for batch in self.tables.batches(projection, names):
            if filter is not None:
                yield from ds.dataset(pa.Table.from_batches([batch])).to_batches(filter=filter)
            else:
                yield batch


def stages_dataset(run: RunReader, stages: Sequence[str]) -> ds.Dataset | JoinedStages:
    """What the report, ``inspect`` and ``stats`` scan: one stage's dataset, or the stages joined."""
    if len(stages) == 1:
        return run.dataset(stages[0])
    parts = [ScoreTables(run.url, BATCH_ROWS, stage) for stage in stages]
    return JoinedStages(JoinedTables(parts, [None] * len(parts), stages=list(stages)))
