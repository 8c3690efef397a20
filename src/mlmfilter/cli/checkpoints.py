"""`mlmfilter convert` (any released judge layout -> a folder transformers loads) and `mlmfilter judges`.

The layout is detected from the checkpoint's config.json:

- ``llava-1.5``: haotian-liu/LLaVA (the 13B MLM-Filter judges) -> :mod:`mlmfilter.convert.llava`
- ``llava-unified``: Victorwz/LLaVA-Unified (Llama-3.x / Qwen2.5 judges, SigLIP, ``aapool_mlp``)
  -> :mod:`mlmfilter.convert.unified`
- ``aitqe``: hanhuang22/AITQE ``MMForCausalLM`` -> :mod:`mlmfilter.convert.aitqe`
- ``hf``: already a transformers folder (nothing to do)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import typer

from mlmfilter.cli.common import console, setup_logging, user_errors

LAYOUTS = ("llava-1.5", "llava-unified", "aitqe", "hf")


def detect_layout(config: Mapping[str, Any]) -> str:
    """Which original code saved this config.json (see the module docstring); ValueError if none."""
    from mlmfilter.judge.registry import identify

    if config.get("model_type") == "mm" and "image_tile_tokens" in config:
        return "aitqe"
    if "mm_vision_tower" in config or "mm_projector_type" in config:
        judge = identify(config)
        if judge is not None and judge.key == "mlm-filter-llava-13b":
            return "llava-1.5"
        arch = " ".join([str(config.get("model_type", "")), *map(str, config.get("architectures") or [])]).lower()
        unified = (
            "qwen" in arch
            or config.get("mm_projector_type") == "aapool_mlp"
            or "siglip" in str(config.get("mm_vision_tower", "")).lower()
        )
        return "llava-unified" if unified or judge is not None else "llava-1.5"
    if "text_config" in config and "vision_config" in config:
        return "hf"
    raise ValueError(
        "config.json is neither an original LLaVA(-Unified) checkpoint (mm_* fields), an AITQE checkpoint "
        "(image_tile_tokens) nor a transformers vision-language model"
    )


def local_folder(src: str | Path) -> Path:
    """A local folder as is; a hub id through the hub cache (a download unless HF_HUB_OFFLINE is set)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(src)))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, no access: one clear line
        raise FileNotFoundError(
            f"{src} is not a local folder and cannot be fetched from the hub ({type(exc).__name__}: {exc})"
        ) from exc


def convert_checkpoint(
    src: str | Path, dst: str | Path, dtype: str = "auto", vision_tower: str | None = None
) -> tuple[str, Path]:
    """Detect ``src``'s layout and convert it into ``dst``; returns (layout, output folder)."""
    folder = local_folder(src)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a model folder")
    layout = detect_layout(json.loads(config_file.read_text(encoding="utf-8")))
    if layout == "llava-1.5":
        from mlmfilter.convert.llava import convert_llava_checkpoint

        return layout, convert_llava_checkpoint(folder, dst, dtype=dtype, vision_tower=vision_tower)
    if layout == "llava-unified":
        from mlmfilter.convert.unified import convert_unified_checkpoint

        return layout, convert_unified_checkpoint(folder, dst, dtype=dtype, vision_tower=vision_tower)
    if layout == "aitqe":
        from mlmfilter.convert.aitqe import convert_aitqe_checkpoint

        return layout, convert_aitqe_checkpoint(folder, dst, dtype=dtype, vision_tower=vision_tower)
    raise ValueError(f"{folder} is already a transformers model folder: score with it directly (no conversion)")


def convert_llava(
    src: Path = typer.Argument(..., help="Original LLaVA-1.5-layout checkpoint folder."),
    dst: Path = typer.Argument(..., help="Output folder in the Hugging Face llava-hf format."),
    vision_tower: Optional[str] = typer.Option(None, help="CLIP vision tower id/path (default: from its config)."),
    dtype: str = typer.Option("auto", help="auto, fp32, bf16, fp16."),
) -> None:
    """Convert an original LLaVA-1.5 checkpoint (e.g. mlm-filter-llava-13b-gpt4v) to llava-hf."""
    from mlmfilter.convert.llava import convert_llava_checkpoint

    setup_logging(False)
    with user_errors():
        out = convert_llava_checkpoint(src, dst, dtype=dtype, vision_tower=vision_tower)
    console.print(f"converted checkpoint written to {out}")


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
        from mlmfilter.judge.registry import identify, read_config

        with user_errors():
            layout, out = convert_checkpoint(src, dst, dtype=dtype, vision_tower=vision_tower)
            judge = identify(read_config(str(out)) or {})
        console.print(f"{layout} checkpoint converted to {out}")
        if judge is not None:
            console.print(f"released judge: {judge.key}; trained with {judge.trained.as_dict()}")

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
            from mlmfilter.convert.dumps import export_mlm_filter

            written = export_mlm_filter(run, output)
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
            from mlmfilter.convert.dumps import import_mlm_filter

            counts = import_mlm_filter(dumps, output, shards=shards or None)
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
                    k: v.describe("trained") | {"released_script_settings": v.released_script.as_dict()}
                    for k, v in REGISTRY.items()
                }
            )
        )
