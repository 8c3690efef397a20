"""`mlmfilter reshard`: new WebDataset shards holding exactly the pairs a selection kept."""

from __future__ import annotations

import json
from typing import Optional

import typer

from mlmfilter.cli.common import console, print_json, user_errors


def reshard(
    selection: str = typer.Argument(..., help="Selection folder written by `mlmfilter select` (path or fsspec URL)."),
    output: str = typer.Argument(..., help="Folder for the new WebDataset shards (path or fsspec URL)."),
    samples_per_shard: int = typer.Option(10_000, help="Pairs per output shard."),
    captions: Optional[str] = typer.Option(None, help="Parquet with uid and a replacement caption column."),
    caption_column: str = typer.Option("caption", help="Column of --captions holding the new caption."),
    captions_stage: Optional[str] = typer.Option(
        None, help="Take new captions from this enhancement stage of the run."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the contents of a non-empty output folder."),
    allow_pipe: bool = typer.Option(
        False, "--allow-pipe", help="Allow the run's `pipe:CMD` inputs (runs shell commands)."
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the stats as one JSON object on stdout."),
) -> None:
    """Write new WebDataset shards holding only the kept pairs (optionally with new captions)."""
    from mlmfilter import api

    with user_errors():
        stats = api.reshard(
            selection,
            output,
            samples_per_shard=samples_per_shard,
            captions=captions,
            caption_column=caption_column,
            captions_stage=captions_stage,
            overwrite=overwrite,
            allow_pipe=allow_pipe,
        )
    if json_output:
        print_json(stats)
    else:
        console.print_json(json.dumps({k: v for k, v in stats.items() if k != "shards"}, default=str))
    if stats["kept_uids_not_found"]:
        console.print(
            f"[bold red]error:[/] {stats['kept_uids_not_found']} kept pairs were not found in the shards "
            f"({'; '.join(stats['not_found'][:3])})"
        )
        raise typer.Exit(1)
