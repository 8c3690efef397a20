"""`mlmfilter eval human|corrupt`: how the scorers agree with human judgements, and what they catch."""

from __future__ import annotations

from typing import Any, Optional

import typer

from mlmfilter.cli.common import (
    BATCH_SIZE_OPTION,
    CONVERSATION_OPTION,
    DEVICE_OPTION,
    DTYPE_OPTION,
    METRICS_OPTION,
    MODEL_OPTION,
    READOUT_OPTION,
    SCORER_OPTION,
    SCORER_SETTING_OPTION,
    TEMPLATE_OPTION,
    build_scorer_specs,
    console,
    interruptible,
    shared_scorer_flags,
    user_errors,
)

#: what an interrupted evaluation leaves: its result is written at the end only
NOTHING_WRITTEN = "nothing was written: re-run the same command"

eval_app = typer.Typer(no_args_is_help=True, help=__doc__)


_RANDOM = typer.Option(None, "--allow-random-fallback", help="If the model cannot be found, use a tiny random one.")
_COLUMN = typer.Option(None, "--column", "-c", help="Score columns to evaluate (default: every numeric one).")
_OUTPUT = typer.Option(None, "--output", "-o", help="Write the full result as JSON here.")


@eval_app.command("human")
def human(
    benchmark: str = typer.Option(..., help="flickr8k-expert, flickr8k-crowdflower, clipscore-json or composite."),
    images: str = typer.Option(..., help="Folder the annotations' image names are relative to."),
    annotations: str = typer.Option(
        ..., help="ExpertAnnotations.txt, CrowdFlowerAnnotations.txt or a CLIPScore-style JSON."
    ),
    captions: Optional[str] = typer.Option(None, help="Flickr8k.token.txt (default: beside the annotations)."),
    keep_reference_captions: bool = typer.Option(
        False, help="Expert: keep candidates that are the image's own reference captions (CLIPScore drops them)."
    ),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples for the confidence intervals (0: none)."),
    confidence: float = typer.Option(0.95, help="Confidence level of the intervals."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    column: list[str] = _COLUMN,
    output: Optional[str] = _OUTPUT,
    scorer: list[str] = SCORER_OPTION,
    model: Optional[str] = MODEL_OPTION,
    metrics: Optional[str] = METRICS_OPTION,
    readout: Optional[str] = READOUT_OPTION,
    template: Optional[str] = TEMPLATE_OPTION,
    conversation: Optional[str] = CONVERSATION_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    dtype: Optional[str] = DTYPE_OPTION,
    batch_size: Optional[int] = BATCH_SIZE_OPTION,
    allow_random_fallback: Optional[bool] = _RANDOM,
    option: list[str] = SCORER_SETTING_OPTION,
) -> None:
    """Kendall tau-b/c, Spearman and Pearson (bootstrap CIs) of each score column against human ratings."""
    from mlmfilter import api

    shared = shared_scorer_flags(locals())
    with user_errors(), interruptible(NOTHING_WRITTEN):
        specs = build_scorer_specs(scorer or ["rules"], shared, option or [])
        result = api.evaluate_human(
            benchmark,
            images,
            annotations,
            captions,
            specs,
            keep_reference_captions=keep_reference_captions,
            bootstrap=bootstrap,
            confidence=confidence,
            seed=seed,
            columns=column or None,
            output=output,
        )
    _written(output)
    console.print(_human_table(result))
    _print_warnings(result)
    if not result["judgements_scored"]:
        console.print("[bold red]error:[/] no judgement could be scored (see missing images and pair errors above)")
        raise typer.Exit(1)


@eval_app.command("corrupt")
def corrupt(
    inputs: list[str] = typer.Argument(..., help="Shards: paths, globs, {a..b} brace patterns or fsspec URLs."),
    limit: int = typer.Option(500, help="Use the first N usable pairs."),
    kinds: Optional[str] = typer.Option(None, help="Corruption kinds, comma-separated (default: all)."),
    seed: int = typer.Option(0, help="Seed of the negative generator."),
    allow_pipe: bool = typer.Option(False, "--allow-pipe", help="Allow `pipe:CMD` inputs (runs shell commands)."),
    column: list[str] = _COLUMN,
    output: Optional[str] = _OUTPUT,
    scorer: list[str] = SCORER_OPTION,
    model: Optional[str] = MODEL_OPTION,
    metrics: Optional[str] = METRICS_OPTION,
    readout: Optional[str] = READOUT_OPTION,
    template: Optional[str] = TEMPLATE_OPTION,
    conversation: Optional[str] = CONVERSATION_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    dtype: Optional[str] = DTYPE_OPTION,
    batch_size: Optional[int] = BATCH_SIZE_OPTION,
    allow_random_fallback: Optional[bool] = _RANDOM,
    option: list[str] = SCORER_SETTING_OPTION,
) -> None:
    """Per scorer column and corruption kind: how often the true caption outscores the corrupted one, and the AUC."""
    from mlmfilter import api

    shared = shared_scorer_flags(locals())
    with user_errors(), interruptible(NOTHING_WRITTEN):
        specs = build_scorer_specs(scorer or ["rules"], shared, option or [])
        result = api.evaluate_corrupt(
            inputs,
            specs,
            limit=limit,
            kinds=[k.strip() for k in kinds.split(",") if k.strip()] if kinds else None,
            seed=seed,
            columns=column or None,
            allow_pipe=allow_pipe,
            output=output,
        )
    _written(output)
    console.print(_corrupt_table(result))
    _print_warnings(result)


def _written(output: str | None) -> None:
    if output is not None:
        console.print(f"result written to {output}")


def _print_warnings(result: dict[str, Any]) -> None:
    for warning in result.get("warnings", []):
        console.print(f"[bold red]{warning}[/]")


def _estimate(e: dict[str, Any]) -> str:
    if e["value"] is None:
        return "-"
    interval = f" [{e['low']:.3f}, {e['high']:.3f}]" if e["low"] is not None and e["high"] is not None else ""
    return f"{e['value']:.3f}{interval}"


def _human_table(result: dict[str, Any]):
    from rich.table import Table

    missing = result["missing_images"]
    listed = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
    caption = (
        f"{result['judgements_evaluated']} judgements ({result['pairs']} pairs, {result['images_total']} images); "
        f"{result['judgements_scored']} scored; {result['images_missing']} images missing "
        f"({result['judgements_missing_image']} judgements{': ' + listed if missing else ''}); "
        f"pair errors: {result['pair_errors'] or 'none'}; dropped by protocol: {result['dropped_by_protocol'] or 'none'}. "
        f"Headline: {result['headline']}. {result['aggregation']}."
    )
    table = Table(title=f"eval human: {result['benchmark']}", caption=caption)
    for header in ("column", "n", "tau-b", "tau-c", "spearman", "pearson"):
        table.add_column(header, no_wrap=header == "column", justify="left" if header == "column" else "right")
    for column, stats in result["columns"].items():
        table.add_row(
            column,
            str(stats["n"]),
            *(_estimate(stats[k]) for k in ("kendall_tau_b", "kendall_tau_c", "spearman", "pearson")),
        )
    return table


def _corrupt_table(result: dict[str, Any]):
    from rich.table import Table

    made = ", ".join(f"{k} {v['made']}" for k, v in result["kinds"].items())
    # a column that ignores the caption (image size, aspect) ties on every negative: name it, skip its rows
    blind = [
        c for c, per_kind in result["columns"].items() if per_kind["all"]["n"] and per_kind["all"]["tie_rate"] == 1
    ]
    caption = (
        f"{result['pairs_scored']} of {result['pairs']} pairs scored; negatives made: {made}; "
        f"errors: {result['score_errors'] or 'none'}. Win: the true caption scores strictly higher (higher = better)."
        + (f" All ties, not shown: {', '.join(blind)}." if blind else "")
    )
    table = Table(title="eval corrupt", caption=caption)
    table.add_column("column", no_wrap=True)
    table.add_column("corruption", no_wrap=True)
    for header in ("n", "win", "tie", "loss", "AUC"):
        table.add_column(header, justify="right")
    for column, per_kind in result["columns"].items():
        if column in blind:
            continue
        for i, (kind, stats) in enumerate(per_kind.items()):
            if not stats["n"]:
                table.add_row(column if i == 0 else "", kind, "0", "-", "-", "-", "-")
                continue
            n = stats["n"]
            table.add_row(
                column if i == 0 else "",
                kind,
                str(n),
                f"{stats['wins'] / n:.0%}",
                f"{stats['ties'] / n:.0%}",
                f"{stats['losses'] / n:.0%}",
                f"{stats['auc']:.3f}",
                end_section=kind == "all",
            )
    return table
