"""`mlmfilter select`: pick pairs of scored runs by an expression and/or an exact global top fraction."""

from __future__ import annotations

from typing import Optional

import typer

from mlmfilter.cli.common import console, interruptible, print_json, user_errors


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
    stage: str = typer.Option(
        "score",
        help="Scoring stage of the runs to select from; of one run also several joined on uid "
        "(score,judge: a column both hold is judge.NAME in the later one) or all.",
    ),
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
    """Select pairs: writes uids.npy (DataComp subset), kept.parquet and selection.json.

    \b
    --where grammar (rows missing a value it reads never pass):
      columns     itm, clip_score, rules_ok; of a later stage: judge.rules_ok
      values      66, 0.28, 'truncated_image', True, False
      compare     ==  !=  <  <=  >  >=  (chains: 0.2 <= clip_cosine < 0.9)
      in          error in ('empty_caption', 'truncated_image')
      combine     and  or  not  ( )  (lower case; = is written ==)
      arithmetic  + - * /  ((itm + odf) / 2 >= 60)
    \b
    Examples:
      mlmfilter select RUN --where 'rules_ok and clip_cosine >= 0.28'
      mlmfilter select RUN --top-fraction 0.3 --by clip_score
      mlmfilter select RUN --stage score,judge --where 'rules_ok and itm >= 60'
    """
    from mlmfilter import api
    from mlmfilter.selection.join import parse_run_arguments

    with user_errors(), interruptible("the selection is not complete: re-run the same command"):
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
    if result.runs is not None and result.in_every_run == 0 and result.read:
        raise typer.Exit(1)  # joined runs that share no pair: the empty selection is a mistake, not a result
