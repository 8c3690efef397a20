"""`mlmfilter report`, `inspect` and `stats`: look at a run's scores and pairs without writing code."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mlmfilter.cli.common import console, options_or_exit, user_errors

#: the --stage flag of every command that reads a run's scores
STAGE_HELP = (
    "Stage to read: NAME, several joined on uid (score,judge: a column both hold is judge.NAME in the later one), "
    "or all (every scoring stage)."
)


def report(
    run: str = typer.Argument(..., help="Run folder (path or fsspec URL)."),
    output: Optional[str] = typer.Option(
        None,
        "--output",
        "-o",
        help="The HTML file to write, a path or fsspec URL (default: RUN/report.html).",
        show_default=False,
    ),
    selection: Optional[str] = typer.Option(None, help="Selection folder (default: RUN/selection when present)."),
    column: list[str] = typer.Option(None, "--column", "-c", help="Score columns to show (default: all)."),
    gallery_size: int = typer.Option(8, help="Pairs per gallery."),
    stage: str = typer.Option("all", "--stage", help=STAGE_HELP + " A selection's own stages come first."),
) -> None:
    """One self-contained HTML page: distributions, thresholds, disagreements, galleries, errors, provenance."""
    from mlmfilter import api
    from mlmfilter.report import ReportOptions

    options = options_or_exit(ReportOptions, columns=column or None, gallery_size=gallery_size, stage=stage)
    with user_errors():  # a missing extra (matplotlib) too: it says what to install
        path = api.report(run, output, selection, options)
    size = f" ({path.stat().st_size / 1e6:.1f} MB)" if isinstance(path, Path) else ""
    console.print(f"report written to {path}{size}; open it in any browser, offline")


def inspect(
    run: str = typer.Argument(..., help="Run folder (path or fsspec URL)."),
    where: Optional[str] = typer.Option(None, "--where", "-w", help="Expression, e.g. 'not rules_ok' or 'itm < 30'."),
    limit: int = typer.Option(20, help="Pairs to show at most."),
    column: list[str] = typer.Option(
        None, "--column", "-c", help="Columns to show, text too (default: scores, flags and which rule failed)."
    ),
    html: Optional[str] = typer.Option(None, "--html", help="Also write a contact sheet with thumbnails here."),
    stage: str = typer.Option("all", "--stage", help=STAGE_HELP),
) -> None:
    """The pairs matching an expression: uid, caption, scores and error, read back from the shards."""
    from rich.table import Table

    from mlmfilter import api
    from mlmfilter.report.render import format_number

    if limit < 1:
        raise typer.BadParameter("--limit must be at least 1")
    with user_errors():
        matches = api.inspect(run, where, limit, columns=column or None, html=html, stage=stage)
    table = Table(
        title=f"{matches.matched} pair(s) match {where or '(everything)'}; showing {len(matches.rows)}", show_lines=True
    )
    table.add_column("uid", no_wrap=True, min_width=32)  # whole, so it can be copied
    table.add_column("shard/key", no_wrap=True)
    for name in ("caption", "scores", "error"):
        table.add_column(name, overflow="fold", ratio=1)
    for ref in matches.rows:
        shown = matches.sample(ref)
        if shown is None:
            caption = "(not found in its shard)" if ref.in_shard else "(no sample: the shard broke here)"
        else:
            caption = shown.caption if shown.caption is not None else "(no caption)"
        scores = ", ".join(f"{k} {format_number(v)}" for k, v in ref.values.items() if v is not None and v != "")
        error = f"{ref.error}: {ref.error_detail or ''}" if ref.error else ""
        table.add_row(ref.uid, f"{ref.shard}/{ref.key}", caption, scores, error)
    typer.echo(_render(table))
    if matches.not_found:
        console.print(f"[yellow]{len(matches.not_found)} pair(s) were not found in their shards again[/]")
    if html is not None:
        console.print(f"contact sheet written to {html}")


def stats(
    run: str = typer.Argument(..., help="Run folder (path or fsspec URL)."),
    column: list[str] = typer.Option(None, "--column", "-c", help="Score columns (default: every numeric one)."),
    bins: int = typer.Option(16, help="Histogram bars (a divisor of 4096: 8, 16, 32, 64)."),
    stage: str = typer.Option("all", "--stage", help=STAGE_HELP),
) -> None:
    """Quantiles and a terminal histogram per score column, to pick a threshold without code."""
    from mlmfilter import api
    from mlmfilter.report.profile import FINE_BINS
    from mlmfilter.report.terminal import headline, histogram_table, quantile_table

    if bins < 1 or FINE_BINS % bins:
        raise typer.BadParameter(f"--bins must divide {FINE_BINS} (e.g. 8, 16, 32, 64)")
    with user_errors():
        result = api.stats(run, column or None, stage=stage)
    for warning in result.warnings:
        typer.secho(warning, fg="red", bold=True, err=True)
    if result.stages and len(result.stages) > 1:
        typer.echo(f"stages {', '.join(result.stages)}, joined on uid\n")
    for name, profile in result.profiles.items():
        if profile.empty:
            typer.echo(f"{name}: no values ({profile.missing} rows missing)\n")
            continue
        typer.echo(headline(profile))
        typer.echo(_render(quantile_table(profile)))
        typer.echo(_render(histogram_table(profile, bins)) + "\n")


def _render(renderable) -> str:
    """Rich output as plain text on stdout (pipes and files get it too, without colour codes)."""
    import io
    import shutil

    from rich.console import Console

    buffer = io.StringIO()
    Console(file=buffer, width=max(shutil.get_terminal_size((120, 24)).columns, 100), color_system=None).print(
        renderable
    )
    return buffer.getvalue().rstrip()
