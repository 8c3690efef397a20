"""Select pairs from a scored run: an expression, a global top fraction, or both.

Semantics (DataComp style):

* The pool is every row of the run's scoring stage (``RUN/score/tables/*.parquet`` of the
  completed shards), errored rows included. A run whose stage is not complete (shards without
  a completion marker, e.g. still running or failed) is refused unless ``allow_incomplete``:
  "the top 30%" of a third of the data is not what anyone asked for. Completeness is recorded.
* ``expression`` keeps rows where it is true; rows missing a value it reads never pass
  (see :mod:`mlmfilter.selection.expression`).
* ``top_fraction`` keeps ``k = round(top_fraction * rows read)`` rows -- a fraction of the whole
  pool, not of the rows that passed the expression -- chosen among the rows that pass the
  expression and have a ``by`` value (not null, not NaN): the highest ``by`` first (lowest with
  ``ascending=True``); on equal ``by``, the smaller uid (as a 128-bit unsigned integer), then the
  earlier row. The cut is exact: ties at the boundary are split, never all kept. When fewer rows
  qualify than k, all of them are kept and the result says so.

Everything streams: memory depends on the batch size and on how many rows are kept (16 bytes a
uid for the sorted ``uids.npy``), not on the size of the run. The outputs, each written
atomically, make a selection folder (:mod:`mlmfilter.selection.folder`): ``uids.npy``,
``kept.parquet`` and ``selection.json`` (this SelectionResult). The run's score tables are read
through :class:`~mlmfilter.selection.tables.ScoreTables`.

Several runs (``run_dir`` a list) are joined on uid first: see :mod:`mlmfilter.selection.join`
for the pool, the column names and duplicate uids. Each run must be complete (or
``allow_incomplete``); the output folder must be given.

External uid lists (``intersect`` / ``union``, ``.npy`` files: see
:func:`~mlmfilter.selection.subset.read_uid_list`) apply after the expression and the top
fraction, which are computed exactly as without them::

    kept = (selected ∩ intersect_1 ∩ intersect_2 ...) ∪ (pool rows whose uid is in union_1 ∪ union_2 ...)

A union adds rows of the pool (the first run's rows) only: uids of a list that no run holds
cannot be written as shards from these runs, so they are counted (``outside_pool``), not added.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mlmfilter import __version__
from mlmfilter.io.uid import HALVES_DTYPE
from mlmfilter.io.writers import AtomicFile
from mlmfilter.runs.read import RunReader
from mlmfilter.selection.expression import parse_expression
from mlmfilter.selection.folder import SelectionFolder
from mlmfilter.selection.join import JoinedTables
from mlmfilter.selection.stages import resolve_stages, stage_names
from mlmfilter.selection.subset import SubsetAccumulator, UidLists
from mlmfilter.selection.tables import BATCH_ROWS, DEFAULT_STAGE, ScoreTables, SelectionError
from mlmfilter.selection.topk import DEFAULT_CANDIDATE_CAP, RadixTopK, ScoreBatch, ScoreKeys, TopKThreshold, top_k_mask

ERROR_COLUMN = "error"
IDENTITY_COLUMNS = ("uid", "uid_f0", "uid_f1", "shard", "key")
# Internal projected columns; the leading "__" keeps them apart from score columns.
_PASSED, _QUALIFIES = "__passed", "__qualifies"


@dataclass
class SelectionResult:
    run_dir: Path | str
    output_dir: Path | str
    read: int  # every row of the run: the pool
    scored: int  # rows without an error
    errors: Counter  # error reason -> rows
    passed: int  # rows the expression passed (all rows without an expression)
    qualified: int  # rows that may be kept: passed and, with top_fraction, have a `by` value
    kept: int
    target: int | None  # k = round(top_fraction * read); None without top_fraction
    threshold: dict[str, Any] | None  # the last kept row of a top fraction, and the ties around it
    notes: list[str]
    arguments: dict[str, Any]
    paths: dict[str, Path | str]
    passes: int  # streaming reads of the score files
    seconds: float
    files: int = 0
    completeness: dict[str, Any] | None = None
    selected: int | None = None  # rows the expression / top fraction chose, before the uid lists
    runs: list[dict[str, Any]] | None = None  # with several runs: each run, its columns and misses
    missing: dict[str, int] | None = None  # with several runs: run -> rows of the pool it lacks
    in_every_run: int | None = None  # with several runs: pool rows every run holds (only they may pass)
    uid_lists: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        counts = {
            "read": self.read,
            "scored": self.scored,
            "errored": sum(self.errors.values()),
            "passed": self.passed,
            "qualified": self.qualified,
            "selected": self.kept if self.selected is None else self.selected,
            "kept": self.kept,
            "target": self.target,
        }
        if self.runs is not None:
            counts["in_every_run"] = self.in_every_run
            counts["missing"] = self.missing
        return {
            "mlmfilter": __version__,
            "run_dir": str(self.run_dir),
            "run_dir_relative": SelectionFolder(self.output_dir).run_dir_relative(self.run_dir),
            "arguments": self.arguments,
            "completeness": self.completeness,
            "runs": self.runs,
            "uid_lists": self.uid_lists,
            "counts": counts,
            "errors": dict(sorted(self.errors.items())),
            "threshold": self.threshold,
            "notes": self.notes,
            "paths": {name: str(path) for name, path in self.paths.items()},
            "score_files": self.files,
            "passes": self.passes,
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        what = "stage" if self.runs and "stage" in self.runs[0] else "run"
        runs = f" of {len(self.runs)} {what}s" if self.runs else ""
        lines = [f"read {self.read} rows from {self.files} score files{runs} ({sum(self.errors.values())} errored)"]
        if self.runs:
            missing = ", ".join(f"{n} from {run}" for run, n in self.missing.items() if n)
            lines.append(f"{self.in_every_run} rows are in every {what}" + (f"; missing: {missing}" if missing else ""))
        lines.append(
            f"kept {self.kept}"
            + (f" of target {self.target}" if self.target is not None else "")
            + f" ({self.passed} passed the expression, {self.qualified} qualified)"
        )
        for entry in self.uid_lists:
            lines.append(
                f"--{entry['mode']} {entry['path']}: {entry['uids']} uids, {entry['matched']} rows of the pool"
                + (f", {entry['added']} added" if entry["mode"] == "union" else f", {entry['removed']} removed")
            )
        if self.threshold:
            lines.append(f"boundary {self.threshold['by']} = {self.threshold['score']} (uid {self.threshold['uid']})")
        lines += self.notes
        lines.append(f"wrote {', '.join(str(p) for p in self.paths.values())}")
        return "\n".join(lines)


def select_run(
    run_dir: str | Path | Sequence[str | Path | tuple[str | None, str | Path]],
    output_dir: str | Path,
    expression: str | None = None,
    top_fraction: float | None = None,
    by: str | None = None,
    ascending: bool = False,
    *,
    stage: str | Sequence[str] = DEFAULT_STAGE,
    allow_incomplete: bool = False,
    intersect: Sequence[str | Path] = (),
    union: Sequence[str | Path] = (),
    candidate_cap: int = DEFAULT_CANDIDATE_CAP,
    batch_rows: int = BATCH_ROWS,
) -> SelectionResult:
    """Select rows of a run's score tables and write uids.npy, kept.parquet and selection.json.

    ``run_dir`` is one run folder, or several (a list; an item ``(name, path)`` prefixes that
    run's columns with ``name_``), joined on uid. ``ascending=True`` keeps the lowest ``by``
    values instead of the highest. ``candidate_cap`` bounds the rows the exact top-k holds in
    memory for its final sort. ``stage`` names the scoring stage to read (in every run), or
    several stages of one run joined on uid (``"score,judge"``, ``"all"``: see
    :mod:`mlmfilter.selection.stages`);
    ``allow_incomplete`` selects from runs some of whose shards are not done (the result records
    it). ``intersect`` / ``union``: external uid lists (``.npy``), applied after the selection.
    """
    started = time.perf_counter()
    folder = SelectionFolder(output_dir)
    output_dir = folder.path  # a Path, or the URL of a folder on object storage
    folder.check_writable()
    specs = _run_specs(run_dir)
    stages = _stages(specs, stage)
    companions: list[str] = []
    if len(stages) == 1 and len(specs) == 1 and specs[0][0] is None:
        # columns the expression names that this stage lacks (dup_keep, distilled_itm) come from the
        # other stages of the same run that hold them, joined on uid
        companions = companion_stages(ScoreTables(specs[0][1], batch_rows, stages[0]), stages[0], expression, by)
        stages = stages + companions
    if len(stages) > 1:  # stages of one run, joined on uid (a cascade: score, then judge)
        parts = [ScoreTables(specs[0][1], batch_rows, name) for name in stages]
    else:
        parts = [ScoreTables(path, batch_rows, stages[0]) for _, path in specs]
    for part, name in zip(parts, stages if len(stages) > 1 else stages * len(parts)):
        _check_complete(part, name, allow_incomplete)
    try:
        uid_lists = UidLists(intersect, union)  # malformed files are refused before anything is read
    except ValueError as exc:
        raise SelectionError(str(exc)) from None
    try:
        if len(stages) > 1:
            tables = JoinedTables(parts, [None] * len(parts), stages=stages)
        elif len(parts) == 1 and specs[0][0] is None:
            tables = parts[0]
        else:
            tables = JoinedTables(parts, [n for n, _ in specs])
    except ValueError as exc:  # a column clash
        raise SelectionError(str(exc)) from None
    joined = isinstance(tables, JoinedTables)
    run_dir = tables.run_dir
    completeness = parts[0].completeness.to_json()
    arguments = {
        "run_dir": str(run_dir),
        "stage": stage if isinstance(stage, str) else ",".join(stage),
        "stages": stages,
        "expression": expression,
        "top_fraction": top_fraction,
        "by": by,
        "ascending": ascending,
        "allow_incomplete": allow_incomplete,
        "intersect": [str(p) for p in intersect],
        "union": [str(p) for p in union],
    }
    if joined:
        arguments["runs"] = [f"{name}={path}" if name else str(path) for name, path in specs]
    plan = _Plan.build(tables, expression, top_fraction, by, ascending)
    replaced = _previous_selection(folder)
    counts = _Counts()
    with _KeptOutputs(folder, tables, plan.output_columns, uid_lists) as outputs:
        if plan.top_fraction is None:
            passes, threshold = _keep_passing(tables, plan, counts, outputs), None
        else:
            passes, threshold = _keep_top_fraction(tables, plan, counts, outputs, candidate_cap)

    notes = [replaced] if replaced else []
    notes += [
        f"joined stage {other!r} of the same run (for {', '.join(_columns_of(parts[i + 1], expression, by))})"
        for i, other in enumerate(companions)
    ]
    if outputs.unique_uids != outputs.rows:
        notes.append(
            f"{outputs.rows - outputs.unique_uids} kept rows repeat a uid; uids.npy holds {outputs.unique_uids} uids"
        )
    if plan.top_fraction is not None and counts.qualified < plan.target(counts.read):
        notes.append(
            f"only {counts.qualified} rows qualify, fewer than the target {plan.target(counts.read)} "
            f"({top_fraction} of {counts.read}): all of them are kept"
        )
    for part in parts:
        if not part.completeness.complete:
            notes.append(
                f"incomplete run {part.run_dir}: selected from {part.completeness.done} of "
                f"{part.completeness.total} shards"
            )
    missing = runs = None
    if joined:
        runs = tables.runs_json()
        missing = {}
        for index, entry in enumerate(runs):
            entry["missing"] = tables.stats.missing[index] + counts.missing_outside[index]
            missing[tables.label(index)] = entry["missing"]
        duplicates = [f"{e['duplicate_uids']} in {tables.label(i)}" for i, e in enumerate(runs) if e["duplicate_uids"]]
        if duplicates:
            notes.append(f"repeated uids joined by their first row: {', '.join(duplicates)}")
        if tables.stats.in_every_run == 0 and counts.read:
            what = "stage" if tables.stages is not None else "run"
            notes.append(
                f"no pair is in every {what}: they share no uid, so nothing can pass. A join needs the same pairs "
                "in each (a uid is the sample json's DataComp uid, else made from the shard file name and key: "
                "runs of differently named copies of the shards, or of other inputs, share none)"
            )
    result = SelectionResult(
        run_dir=run_dir,
        output_dir=output_dir,
        read=counts.read,
        scored=counts.scored,
        errors=counts.errors,
        passed=counts.passed,
        qualified=counts.qualified,
        kept=outputs.rows,
        target=plan.target(counts.read) if plan.top_fraction is not None else None,
        threshold=threshold,
        notes=notes,
        arguments=arguments,
        paths=folder.paths(),
        passes=passes,
        seconds=time.perf_counter() - started,
        files=len(tables.files),
        completeness=completeness,
        selected=outputs.selected,
        runs=runs,
        missing=missing,
        in_every_run=tables.stats.in_every_run if joined else None,
        uid_lists=uid_lists.to_json(),
    )
    folder.write_summary(result.to_json())
    return result


def companion_stages(first: ScoreTables, stage: str, expression: str | None, by: str | None) -> list[str]:
    """Other stages of the same run that hold columns the selection names and ``stage`` lacks
    (``dup_keep`` of ``mlmfilter dedup``, ``distilled_itm`` of ``mlmfilter distill``): each such
    column comes from the first stage (in the run's order) that has it; they are joined on uid."""
    from mlmfilter.selection.expression import ExpressionError, expression_names

    try:
        names = expression_names(expression) if expression and expression.strip() else []
    except ExpressionError:
        return []  # the plan reports the syntax error with its own message
    wanted = [n for n in dict.fromkeys(names + ([by] if by else [])) if n not in first.columns]
    found: list[str] = []
    for other, columns in first.run.columns_by_stage((stage,)).items() if wanted else ():
        if any(name in columns for name in wanted):
            found.append(other)
            wanted = [n for n in wanted if n not in columns]
    return found


def _columns_of(part: ScoreTables, expression: str | None, by: str | None) -> list[str]:
    from mlmfilter.selection.expression import expression_names

    names = expression_names(expression) if expression and expression.strip() else []
    return [n for n in dict.fromkeys(names + ([by] if by else [])) if n in part.columns]


def _run_specs(run_dir: Any) -> list[tuple[str | None, str | Path]]:
    """(name or None, path) for each run; one path is one unnamed run."""
    if isinstance(run_dir, (str, Path)):
        return [(None, run_dir)]
    specs = [item if isinstance(item, tuple) else (None, item) for item in run_dir]
    if not specs:
        raise SelectionError("no run to select from")
    for name, _ in specs:
        if name is not None and not name.isidentifier():
            raise SelectionError(f"run name {name!r} must be a plain name (letters, digits, _), as it prefixes columns")
    return specs


def _previous_selection(folder: SelectionFolder) -> str | None:
    """What the selection this one replaces had chosen, said in the summary (never silently)."""
    if not folder.exists():
        return None
    try:
        summary = folder.summary()
    except (OSError, ValueError):
        return f"replaced the earlier selection in {folder.url}"
    arguments = summary.get("arguments") or {}
    how = [f"--where {arguments['expression']!r}"] if arguments.get("expression") else []
    if arguments.get("top_fraction") is not None:
        how.append(f"--top-fraction {arguments['top_fraction']} --by {arguments.get('by')}")
    kept = (summary.get("counts") or {}).get("kept")
    return (
        f"replaced the earlier selection in {folder.url} (kept {kept}"
        + (f", {' '.join(how)}" if how else "")
        + "); -o DIR keeps several side by side"
    )


def _stages(specs: list[tuple[str | None, str | Path]], stage: str | Sequence[str]) -> list[str]:
    """The stages to read: one (of every run), or several of one run (``score,judge``, ``all``)."""
    names = stage_names(stage)
    if names is not None and len(names) == 1:
        return names
    if len(specs) > 1 or specs[0][0] is not None:
        raise SelectionError(
            f"--stage {stage if isinstance(stage, str) else ','.join(stage)} joins stages of one run; "
            "with several runs give one stage (the same in every run)"
        )
    return resolve_stages(RunReader(specs[0][1]), names)


def _check_complete(tables: "ScoreTables", stage: str, allow_incomplete: bool) -> None:
    done = tables.completeness
    if not done.complete and not allow_incomplete:
        missing = ", ".join(done.missing[:5]) + (" ..." if len(done.missing) > 5 else "")
        raise SelectionError(
            f"stage {stage!r} of {tables.run_dir} is incomplete: {done.done} of {done.total} "
            f"shards done (missing: {missing}); finish it (re-run `mlmfilter score`, it resumes) "
            "or pass --allow-incomplete to select from the done shards only"
        )


@dataclass
class _Plan:
    """What to read and how to judge each row, checked against the run's columns up front."""

    qualifies: pc.Expression  # passed and (with top_fraction) has a `by` value
    passed: pc.Expression
    top_fraction: float | None
    by: str | None
    score_keys: ScoreKeys | None
    output_columns: list[str]  # uid, shard, key, by and the expression's columns
    tables: ScoreTables
    expression_columns: list[str]

    @classmethod
    def build(
        cls, tables: ScoreTables, expression: str | None, top_fraction: float | None, by: str | None, ascending: bool
    ) -> "_Plan":
        expression = expression if expression and expression.strip() else None
        if expression is None and top_fraction is None:
            raise SelectionError("nothing to select by: give an expression, a top fraction, or both")
        if top_fraction is not None:
            if not (isinstance(top_fraction, (int, float)) and math.isfinite(top_fraction) and 0 < top_fraction <= 1):
                raise SelectionError(f"top_fraction must be in (0, 1], got {top_fraction!r}")
            if by is None:
                raise SelectionError(
                    "--top-fraction needs --by COLUMN, the column to rank by (top_fraction needs `by`); "
                    f"score columns: {', '.join(_score_columns(tables))}"
                )
        elif by is not None:
            raise SelectionError("--by ranks rows for --top-fraction; give --top-fraction too, or drop --by")

        passed, expression_columns = pc.scalar(True), []
        if expression is not None:
            compiled = parse_expression(expression, tables.schema)  # raises ExpressionError
            passed, expression_columns = compiled.expression, list(compiled.columns)
        if tables.presence is not None:  # joined runs: a uid missing from a run never passes
            passed = pc.and_kleene(tables.presence, passed)
        qualifies, score_keys = passed, None
        if by is not None:
            score_keys = _rank_keys(tables, by, ascending)
            qualifies = pc.and_kleene(pc.invert(pc.is_null(pc.field(by), nan_is_null=True)), passed)
        identity = [c for c in IDENTITY_COLUMNS if c in tables.columns]
        output_columns = _unique(identity + ([by] if by else []) + expression_columns)
        return cls(qualifies, passed, top_fraction, by, score_keys, output_columns, tables, expression_columns)

    def target(self, read: int) -> int:
        return round(self.top_fraction * read)

    def scan(self, names: list[str], count: bool = False) -> Iterator[pa.RecordBatch]:
        """One pass reading these columns plus the row verdicts; ``count`` adds what
        :class:`_Counts` needs."""
        if count and ERROR_COLUMN in self.tables.columns:
            names = names + [ERROR_COLUMN]
        projection = {name: pc.field(name) for name in _unique(names)}
        projection[_PASSED] = self.passed
        projection[_QUALIFIES] = self.qualifies
        reads = _unique(list(projection)[:-2] + self.expression_columns + ([self.by] if self.by else []))
        return self.tables.batches(projection, reads)


class _Counts:
    def __init__(self) -> None:
        self.read = self.scored = self.passed = self.qualified = 0
        self.errors: Counter = Counter()
        self.missing_outside: list[int] = []  # joined runs: per run, pool uids outside the first run it lacks

    def finish_pass(self, tables: ScoreTables | JoinedTables) -> None:
        """After the counting pass: uids only other runs hold join the pool (they never pass)."""
        if isinstance(tables, JoinedTables):
            extra, self.missing_outside = tables.rows_only_in_other_runs()
            self.read += extra

    def add(self, batch: pa.RecordBatch) -> None:
        self.read += batch.num_rows
        self.passed += _true_count(batch.column(_PASSED))
        self.qualified += _true_count(batch.column(_QUALIFIES))
        if ERROR_COLUMN in batch.schema.names:
            errors = batch.column(ERROR_COLUMN)
            self.scored += batch.num_rows - (len(errors) - errors.null_count)
            if errors.null_count < len(errors):
                for entry in pc.value_counts(errors.drop_null()).to_pylist():
                    self.errors[entry["values"]] += entry["counts"]
        else:
            self.scored += batch.num_rows


def _keep_passing(tables: ScoreTables, plan: _Plan, counts: _Counts, outputs: "_KeptOutputs") -> int:
    """Expression only: one pass counts and keeps. Returns the number of passes."""
    for batch in plan.scan(plan.output_columns, count=True):
        counts.add(batch)
        outputs.write(batch, _expression_mask(batch, tables))
    counts.finish_pass(tables)
    return 1


def _keep_top_fraction(
    tables: ScoreTables, plan: _Plan, counts: _Counts, outputs: "_KeptOutputs", cap: int
) -> tuple[int, dict[str, Any] | None]:
    """Find the threshold, then one more pass keeps the rows at or above it.
    Returns the number of passes and what to report about the threshold."""
    threshold = _find_threshold(tables, plan, counts, cap)
    ties = _TieCount(plan.score_keys, threshold)
    for score_batch, batch in _score_batches(tables, plan, plan.output_columns):
        mask = top_k_mask(score_batch, threshold, plan.score_keys)
        ties.add(score_batch, mask)
        outputs.write(batch, mask)
    return threshold.passes + 1, _threshold_info(plan, threshold, ties)


def _find_threshold(tables: ScoreTables, plan: _Plan, counts: _Counts, cap: int) -> TopKThreshold:
    """Radix top-k; its first pass also counts the pool, which k depends on."""
    search = RadixTopK(plan.score_keys, candidate_cap=cap)
    for score_batch, batch in _score_batches(tables, plan, [plan.by], count=True):
        counts.add(batch)
        search.observe(score_batch)
    counts.finish_pass(tables)
    search.k = plan.target(counts.read)
    search.finish_pass()
    while not search.done:
        uids = list(tables.uid_columns) if search.needs_uids else []
        for score_batch, _ in _score_batches(tables, plan, [plan.by] + uids):
            search.observe(score_batch)
        search.finish_pass()
    return search.threshold


def _score_batches(
    tables: ScoreTables, plan: _Plan, columns: list[str], count: bool = False
) -> Iterator[tuple[ScoreBatch, pa.RecordBatch]]:
    """The batches of one pass reading ``columns``, as top-k sees them (uids only if read)."""
    ordinal = 0
    with_uids = all(name in columns for name in tables.uid_columns)
    for batch in plan.scan(columns, count=count):
        yield (
            ScoreBatch(
                scores=_numpy_values(batch.column(plan.by)),
                eligible=_bool_mask(batch.column(_QUALIFIES)),
                first_ordinal=ordinal,
                uid_halves=_uid_reader(tables, batch) if with_uids else _no_uids,
            ),
            batch,
        )
        ordinal += batch.num_rows


def _uid_reader(tables: ScoreTables, batch: pa.RecordBatch) -> Callable[[np.ndarray], np.ndarray]:
    return lambda rows: tables.uid_halves(batch, rows)


def _no_uids(rows: np.ndarray) -> np.ndarray:
    raise RuntimeError("this pass did not read the uid column")


def _expression_mask(batch: pa.RecordBatch, tables: ScoreTables) -> np.ndarray:
    mask = _bool_mask(batch.column(_PASSED))
    for name in tables.uid_columns:  # a row without a uid cannot go into a subset file
        column = batch.column(name)
        if column.null_count:
            mask &= _bool_mask(column.is_valid())
    return mask


class _TieCount:
    """Rows that share the boundary score: how many there were, and how many the cut kept."""

    def __init__(self, score_keys: ScoreKeys, threshold: TopKThreshold):
        self.score_keys = score_keys
        self.boundary_key = np.uint64(threshold.key[0]) if threshold.boundary is not None else None
        self.total = self.kept = 0

    def add(self, batch: ScoreBatch, kept: np.ndarray) -> None:
        if self.boundary_key is None:
            return
        rows = np.flatnonzero(batch.eligible)
        tied = rows[self.score_keys.keys(batch.scores[rows]) == self.boundary_key]
        self.total += len(tied)
        self.kept += int(kept[tied].sum())


class _KeptOutputs:
    """kept.parquet and uids.npy: kept rows stream to a temp parquet file and their uids to an
    accumulator; on a clean exit both files appear under their names, on an error neither."""

    def __init__(self, folder: SelectionFolder, tables: ScoreTables, columns: list[str], uid_lists: UidLists):
        self.columns = columns
        self.uid_halves = tables.uid_halves
        self.uid_columns = tables.uid_columns
        self.uid_lists = uid_lists
        schema = tables.schema
        self.kept_path, self.subset_path = folder.kept_path, folder.subset_path
        self.file = AtomicFile(self.kept_path)  # creates output_dir
        try:  # writes the header: a full disk fails here already
            self.writer = pq.ParquetWriter(str(self.file.tmp_path), pa.schema([schema.field(c) for c in columns]))
        except BaseException:
            self.file.abort()
            raise
        self.subset = SubsetAccumulator()
        self.rows = self.unique_uids = self.selected = 0

    def write(self, batch: pa.RecordBatch, mask: np.ndarray) -> None:
        """``mask``: the rows the selection chose; the uid lists then remove and add rows."""
        self.selected += int(mask.sum())
        if self.uid_lists:
            mask = self.uid_lists.apply(self._batch_halves(batch), mask)
        if not mask.any():
            return
        kept = batch.filter(pa.array(mask)).select(self.columns)
        self.writer.write_batch(kept)
        self.subset.add(self.uid_halves(kept))
        self.rows += kept.num_rows

    def _batch_halves(self, batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
        """uid halves of every row, and which rows have a uid at all (only they can match a list)."""
        valid = np.ones(batch.num_rows, dtype=bool)
        for name in self.uid_columns:
            if batch.column(name).null_count:
                valid &= _bool_mask(batch.column(name).is_valid())
        rows = np.flatnonzero(valid)
        halves = np.zeros(batch.num_rows, dtype=HALVES_DTYPE)
        if len(rows):
            halves[rows] = self.uid_halves(batch, rows)
        return halves, valid

    def __enter__(self) -> "_KeptOutputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.writer.close()  # writes the footer: fails again on a full disk
        except BaseException:
            self.file.abort()
            if exc_type is None:
                raise
            return
        if exc_type is not None:
            self.file.abort()
            return
        self.file.commit()
        self.unique_uids = self.subset.write(self.subset_path)


def _threshold_info(plan: _Plan, threshold: TopKThreshold | None, ties: "_TieCount | None") -> dict[str, Any] | None:
    if threshold is None or threshold.boundary is None:
        return None
    boundary = threshold.boundary
    return {
        "by": plan.by,
        "ascending": plan.score_keys.ascending,
        "score": boundary.score,
        "uid": boundary.uid,
        "tied_rows": ties.total,  # rows qualifying with exactly the boundary score
        "tied_kept": ties.kept,  # of which the uid tie-break kept these
    }


def _rank_keys(tables: ScoreTables, by: str, ascending: bool) -> ScoreKeys:
    if by not in tables.columns:
        raise SelectionError(f"unknown column {by!r} for `by`; score columns: {_score_columns(tables)}")
    dtype = tables.columns[by]
    try:
        return ScoreKeys(dtype.to_pandas_dtype(), ascending=ascending)
    except (TypeError, NotImplementedError):
        raise SelectionError(f"cannot rank by {by!r} of type {dtype}: need a number or a bool column") from None


def _score_columns(tables: ScoreTables) -> list[str]:
    rankable = [
        name
        for name, t in tables.columns.items()
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
    ]
    return [name for name in rankable if name not in IDENTITY_COLUMNS]


def _numpy_values(array: pa.Array) -> np.ndarray:
    """Values as numpy in their own dtype; nulls become 0 (callers mask them out)."""
    if array.null_count:
        array = array.fill_null(False if pa.types.is_boolean(array.type) else 0)
    return array.to_numpy(zero_copy_only=False)


def _bool_mask(array: pa.Array) -> np.ndarray:
    if array.null_count:
        array = array.fill_null(False)
    return array.to_numpy(zero_copy_only=False)


def _true_count(array: pa.BooleanArray) -> int:
    return array.true_count


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))
