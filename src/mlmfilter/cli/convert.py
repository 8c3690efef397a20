"""`mlmfilter convert` (any released judge layout -> a folder transformers loads), `judges`, and the
MLM-Filter score files: `export` and `import`. The library behind them is :mod:`mlmfilter.convert`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mlmfilter.cli.common import console, print_json, setup_logging, user_errors

#: why a converted model is a local folder (transformers loads it from one)
LOCAL_MODEL_REASON = "transformers loads a model from a local folder"


def convert_log_path(dst: Path) -> Path:
    """The converted folder holds the model's files only (its content hash is its identity): the log
    of the conversion lies beside it, ``DST.log``."""
    dst = Path(dst).expanduser().absolute()
    return dst.parent / f"{dst.name}.log"


def register(app: typer.Typer) -> None:
    @app.command("convert")
    def convert(
        src: str = typer.Argument(
            ..., help="Original checkpoint: a folder or a hub id (e.g. weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o)."
        ),
        dst: str = typer.Argument(..., help="Output folder (loads with transformers' Auto classes)."),
        vision_tower: Optional[str] = typer.Option(
            None,
            help="Vision tower id/path (default: the one config.json names, e.g. google/siglip-so400m-patch14-384).",
        ),
        dtype: str = typer.Option("auto", help="auto (keep), fp32, bf16, fp16."),
        verbose: bool = typer.Option(
            False, "--verbose", "-v", help="Show the libraries' warnings and load reports (always in DST.log)."
        ),
    ) -> None:
        """Convert a released MLM-Filter judge or AITQE from its original layout (detected from config.json)."""
        from mlmfilter import api
        from mlmfilter.cli.quiet import library_log
        from mlmfilter.core.locations import local_path
        from mlmfilter.judge.registry import identify, read_config

        setup_logging(verbose)
        with user_errors():  # refused before anything is written (its log lies beside it)
            log_path = convert_log_path(local_path(dst, "the converted model folder", LOCAL_MODEL_REASON))
        with user_errors(), library_log(log_path, verbose):
            layout, out = api.convert_checkpoint(src, dst, dtype=dtype, vision_tower=vision_tower)
            judge = identify(read_config(str(out)) or {})
        console.print(f"{layout} checkpoint converted to {out}")
        if log_path.exists() and log_path.stat().st_size:
            console.print(f"log (library warnings and load reports too): {log_path}")
        if judge is not None:
            console.print(f"released judge: {judge.key}; trained with {judge.trained.as_dict()}")

    @app.command("convert-llava", hidden=True)
    def convert_llava(
        src: str = typer.Argument(..., help="Original LLaVA-1.5-layout checkpoint folder."),
        dst: str = typer.Argument(..., help="Output folder in the Hugging Face llava-hf format."),
        vision_tower: Optional[str] = typer.Option(None, help="CLIP vision tower id/path (default: from its config)."),
        dtype: str = typer.Option("auto", help="auto, fp32, bf16, fp16."),
    ) -> None:
        """Convert an original LLaVA-1.5 checkpoint (e.g. mlm-filter-llava-13b-gpt4v) to llava-hf."""
        # kept for old scripts: `convert` detects this layout (and every other one) the same way
        from mlmfilter import api

        setup_logging(False)  # the per-shard progress lines
        with user_errors():
            _, out = api.convert_checkpoint(src, dst, dtype=dtype, vision_tower=vision_tower)
        console.print(f"converted checkpoint written to {out}")

    @app.command("export")
    def export(
        run: str = typer.Argument(
            ..., help="Run folder whose score stage holds MLM-Filter columns (itm, odf, ctq, su)."
        ),
        output: str = typer.Option(..., "--output", "-o", help="Folder for the score files (path or fsspec URL)."),
        format: str = typer.Option(
            "mlm-filter", "--format", help="mlm-filter: what the released scoring scripts write."
        ),
        stage: str = typer.Option("score", "--stage", help="The stage holding the judge's scores (a cascade: judge)."),
    ) -> None:
        """Write a run's MLM scores as the released scripts do: {shard}_{metric}.parquet, json fields + {metric}_score."""
        with user_errors():
            if format != "mlm-filter":
                raise ValueError(f"unknown export format {format!r}; known: mlm-filter")
            from mlmfilter import api

            written = api.export_mlm_filter(run, output, stage=stage)
        console.print(f"{len(written)} score files written to {output}")

    @app.command("import")
    def import_dumps(
        dumps: str = typer.Argument(..., help="Folder of published MLM-Filter score files ({shard}_{metric}.parquet)."),
        output: str = typer.Option(..., "--output", "-o", help="Run folder to create (select reads it)."),
        shards: list[str] = typer.Option(None, "--shards", help="The tar shards the scores describe (for reshard)."),
        stage: str = typer.Option("score", "--stage", help="The stage the scores go into."),
    ) -> None:
        """Turn MLM-Filter score dumps into a run: `mlmfilter select RUN --where 'itm >= 85'` then works on them."""
        with user_errors():
            from mlmfilter import api

            counts = api.import_mlm_filter(dumps, output, shards=shards or None, stage=stage)
        console.print(
            f"imported {counts['rows']} pairs of {counts['shards']} shards into {output} "
            f"({counts['unparseable']} unparseable scores kept as error rows"
            + (f", {counts['unidentified']} rows without a key or a valid uid" if counts.get("unidentified") else "")
            + ")"
        )

    @app.command("judges")
    def judges(
        json_output: bool = typer.Option(
            False, "--json", help="Every judge's full description as one JSON object on stdout."
        ),
    ) -> None:
        """The released judges this tool knows and how each is asked (trained vs released-script settings)."""
        from rich.table import Table

        from mlmfilter.judge.registry import REGISTRY

        if json_output:
            print_json(
                {
                    k: v.describe("trained")
                    | {"released_script_settings": v.released_script.as_dict(), "vision_tower": v.vision_tower}
                    for k, v in REGISTRY.items()
                }
            )
            return
        # one small table per judge: its hub ids stay whole on an 80-column terminal
        console.print("released judges (`mlmfilter judges --json`: everything)", highlight=False)
        for key, judge in REGISTRY.items():
            info = judge.describe("trained")
            trained = info["trained_settings"]
            released = judge.released_script.as_dict()
            table = Table(show_header=False, title=key, title_justify="left", title_style="bold")
            table.add_column("field", no_wrap=True, style="dim")
            table.add_column("value", overflow="fold")
            table.add_row("hub ids", "\n".join(info["hub_ids"]))
            table.add_row("model", f"{info['llm']}; {info['vision']}, {info['image_tokens']} image tokens")
            table.add_row("vision tower", judge.vision_tower)
            table.add_row("trained request", ", ".join(f"{k} {_shown(v)}" for k, v in trained.items()))
            differs = ", ".join(f"{k} {_shown(v)}" for k, v in released.items() if trained.get(k) != v)
            table.add_row("released script differs in", differs or "nothing")
            console.print(table)


def _shown(value) -> str:
    """A setting's value in a table cell; a string with edge spaces (the forced space token) quoted."""
    return repr(value) if isinstance(value, str) and (not value or value.strip() != value) else str(value)
