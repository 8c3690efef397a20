"""`mlmfilter convert` (any released judge layout -> a folder transformers loads), `judges`, and the
MLM-Filter score files: `export` and `import`. The library behind them is :mod:`mlmfilter.convert`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mlmfilter.cli.common import console, setup_logging, user_errors


def register(app: typer.Typer) -> None:
    @app.command("convert")
    def convert(
        src: str = typer.Argument(
            ..., help="Original checkpoint: a folder or a hub id (e.g. weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o)."
        ),
        dst: Path = typer.Argument(..., help="Output folder (loads with transformers' Auto classes)."),
        vision_tower: Optional[str] = typer.Option(
            None,
            help="Vision tower id/path (default: the one config.json names, e.g. google/siglip-so400m-patch14-384).",
        ),
        dtype: str = typer.Option("auto", help="auto (keep), fp32, bf16, fp16."),
    ) -> None:
        """Convert a released MLM-Filter judge or AITQE from its original layout (detected from config.json)."""
        from mlmfilter import api
        from mlmfilter.judge.registry import identify, read_config

        with user_errors():
            layout, out = api.convert_checkpoint(src, dst, dtype=dtype, vision_tower=vision_tower)
            judge = identify(read_config(str(out)) or {})
        console.print(f"{layout} checkpoint converted to {out}")
        if judge is not None:
            console.print(f"released judge: {judge.key}; trained with {judge.trained.as_dict()}")

    @app.command("convert-llava", hidden=True)
    def convert_llava(
        src: Path = typer.Argument(..., help="Original LLaVA-1.5-layout checkpoint folder."),
        dst: Path = typer.Argument(..., help="Output folder in the Hugging Face llava-hf format."),
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
        output: Path = typer.Option(..., "--output", "-o", help="Folder for the score files."),
        format: str = typer.Option(
            "mlm-filter", "--format", help="mlm-filter: what the released scoring scripts write."
        ),
    ) -> None:
        """Write a run's MLM scores as the released scripts do: {shard}_{metric}.parquet, json fields + {metric}_score."""
        with user_errors():
            if format != "mlm-filter":
                raise ValueError(f"unknown export format {format!r}; known: mlm-filter")
            from mlmfilter import api

            written = api.export_mlm_filter(run, output)
        console.print(f"{len(written)} score files written to {output}")

    @app.command("import")
    def import_dumps(
        dumps: Path = typer.Argument(
            ..., help="Folder of published MLM-Filter score files ({shard}_{metric}.parquet)."
        ),
        output: Path = typer.Option(..., "--output", "-o", help="Run folder to create (select reads it)."),
        shards: list[str] = typer.Option(None, "--shards", help="The tar shards the scores describe (for reshard)."),
    ) -> None:
        """Turn MLM-Filter score dumps into a run: `mlmfilter select RUN --where 'itm >= 85'` then works on them."""
        with user_errors():
            from mlmfilter import api

            counts = api.import_mlm_filter(dumps, output, shards=shards or None)
        console.print(
            f"imported {counts['rows']} pairs of {counts['shards']} shards into {output} "
            f"({counts['unparseable']} unparseable scores kept as error rows)"
        )

    @app.command("judges")
    def judges() -> None:
        """The released judges this tool knows and how each is asked (trained vs released-script settings)."""
        from mlmfilter.judge.registry import REGISTRY

        console.print_json(
            json.dumps(
                {
                    k: v.describe("trained")
                    | {"released_script_settings": v.released_script.as_dict(), "vision_tower": v.vision_tower}
                    for k, v in REGISTRY.items()
                }
            )
        )
