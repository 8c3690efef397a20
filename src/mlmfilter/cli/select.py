"""`mlmfilter select`: pick pairs of scored runs by an expression and/or an exact global top fraction."""

from __future__ import annotations

from typing import Optional

import typer

from mlmfilter.cli.common import console, print_json, user_errors


def select(
    runs: list[str] = typer.Argument(
        ...,
        metavar="RUN",
        help="Run folders written by `mlmfilter score`; several are joined on uid. NAME=RUN prefixes that run's columns with NAME_.",
    ),
    where: Optional[str] = typer.Option(None, "--where", "-w", help="Expression, e.g. 'itm >= 66 and odf >= 20'."),
    top_fraction: Optional[float] = typer.Option(None, help="Keep this fraction of all pairs, best first."),
    by: Optional[str] = typer.Option(None, help="Column ranked by --top-fraction."),
    output: Optional[str] = typer.Option(
        None, "--output", "-o", help="Selection folder (default RUN/selection; needed with several runs)."
    ),
    stage: str = typer.Option("score", help="Scoring stage of the runs to select from."),
    allow_incomplete: bool = typer.Option(
        False, "--allow-incomplete", help="Select although some shards are not done."
    ),
    intersect: list[str] = typer.Option(
        None, "--intersect", help="Keep only uids also in this .npy uid list (repeatable)."
    ),
    union: list[str] = typer.Option(
        None, "--union", help="Also keep the pool's pairs whose uid is in this .npy uid list (repeatable)."
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
) -> None:
    """Select pairs: writes uids.npy (DataComp subset), kept.parquet and selection.json."""
    from mlmfilter import api
    from mlmfilter.selection.join import parse_run_arguments

    with user_errors():
        parsed = parse_run_arguments(runs)
        result = api.select(
            parsed[0] if len(parsed) == 1 else parsed,
            output,
            expression=where,
            top_fraction=top_fraction,
            by=by,
            stage=stage,
            allow_incomplete=allow_incomplete,
            intersect=intersect or [],
            union=union or [],
        )
    if json_output:
        print_json(result.to_json())
    else:
        console.print(result.summary(), highlight=False)
