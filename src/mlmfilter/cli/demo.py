"""`mlmfilter demo`: score and select the bundled sample data, and show what happened to each pair."""

from __future__ import annotations

from pathlib import Path

import typer

from mlmfilter.cli.common import console, setup_logging


def demo(
    output: Path = typer.Argument(Path("mlmfilter-demo"), help="Folder for the sample shards, run and selection."),
    mlm: bool = typer.Option(True, help="Also run the MLM judge (a tiny random stand-in offline)."),
) -> None:
    """Score and select the bundled sample data (built from photos that ship with scikit-image & co)."""
    from mlmfilter.demo.run import run_demo

    setup_logging(False)
    run_demo(output, with_mlm=mlm, console=console)
