"""`mlmfilter demo`: score and select the bundled sample data, and show what happened to each pair."""

from __future__ import annotations

import typer

from mlmfilter.cli.common import console, setup_logging, user_errors


def demo(
    output: str = typer.Argument("mlmfilter-demo", help="Folder for the sample shards, run and selection."),
    mlm: bool = typer.Option(True, help="Also run the MLM judge (a tiny random stand-in offline)."),
) -> None:
    """Score and select the bundled sample data (built from photos that ship with scikit-image & co)."""
    from mlmfilter.core.locations import local_path
    from mlmfilter.demo.run import run_demo

    setup_logging(False)
    with user_errors():  # the demo builds its shards in a local folder
        folder = local_path(output, "the demo folder")
    run_demo(folder, with_mlm=mlm, console=console)
