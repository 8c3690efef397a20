"""`mlmfilter inspect`: the pairs matching an expression, with captions read back from the shards."""

from __future__ import annotations

from dataclasses import dataclass

from mlmfilter.io.lookup import lookup_samples
from mlmfilter.io.readers import ReadOptions
from mlmfilter.report.scan import MatchCollector, PairRef, flag_columns, numeric_columns, reason_columns, scan
from mlmfilter.report.thumbnails import ShownSample, ThumbnailMaker
from mlmfilter.runs.read import RunReader
from mlmfilter.selection.expression import parse_expression
from mlmfilter.selection.stages import resolve_stages, stages_dataset


@dataclass
class Matches:
    matched: int  # every matching row of the run
    rows: list[PairRef]  # the first `limit` of them, in table order
    shown: dict[tuple[str, str], ShownSample]
    columns: list[str]  # score columns shown beside each pair
    not_found: list[tuple[str, str]]
    stages: list[str] | None = None  # the stages read, joined on uid when several

    def sample(self, ref: PairRef) -> ShownSample | None:
        return self.shown.get(ref.where)


def find_pairs(
    run: RunReader,
    where: str | None,
    limit: int = 20,
    *,
    columns: list[str] | None = None,
    thumbnails: bool = False,
    thumbnail_side: int = 160,
    stage: str | None = None,
) -> Matches:
    """The first ``limit`` rows where ``where`` holds (all rows without it), looked up in their shards.
    ``stage``: one stage, several joined on uid (``score,judge``), or None / ``all``: every scoring stage.
    Columns: any (text too); by default the numbers, flags and why a flag is false (``rules_failed``).

    Raises :class:`mlmfilter.selection.expression.ExpressionError` (a ValueError) for a bad expression."""
    stages = resolve_stages(run, stage)
    dataset = stages_dataset(run, stages)
    schema = dataset.schema
    shown_columns = columns or [*numeric_columns(schema), *flag_columns(schema), *reason_columns(schema)]
    unknown = [c for c in shown_columns if c not in schema.names]
    if unknown:
        raise ValueError(f"no column {', '.join(map(repr, unknown))} (columns: {', '.join(schema.names)})")
    condition = parse_expression(where, schema) if where else None
    collector = MatchCollector(limit, shown_columns)
    scan(
        dataset,
        [collector],
        shown_columns,
        extra_columns=condition.columns if condition else (),
        filter=condition.expression if condition else None,
    )
    keep = ThumbnailMaker(thumbnail_side) if thumbnails else _caption_only
    found = lookup_samples(
        run.sources(), {r.where for r in collector.rows if r.in_shard}, keep, ReadOptions(**run.read_options())
    )
    return Matches(collector.matched, collector.rows, dict(found), shown_columns, found.missing, stages)


def _caption_only(sample) -> ShownSample:
    problem = f"{sample.error}: {sample.error_detail}" if sample.error else None
    return ShownSample(sample.caption, None, problem)
