"""`mlmfilter plan` (what a scoring will cost, nothing scored; also `score --dry-run`) and `mlmfilter verify`
(re-score a sample of a finished run at batch size 1, in fp32, on a second backend; exit 1 beyond the bound)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from mlmfilter.cli.common import (
    BATCH_SIZE_OPTION,
    CAPTION_COLUMN_OPTION,
    CAPTIONS_FILE_OPTION,
    CONVERSATION_OPTION,
    DEVICE_OPTION,
    DTYPE_OPTION,
    IMAGE_COLUMN_OPTION,
    METRICS_OPTION,
    MODEL_OPTION,
    READOUT_OPTION,
    SCORER_OPTION,
    SCORER_SETTING_OPTION,
    TEMPLATE_OPTION,
    UID_COLUMN_OPTION,
    URL_COLUMN_OPTION,
    VERBOSE_OPTION,
    build_scorer_specs,
    console,
    load_recipe,
    print_json,
    read_flags,
    setup_logging,
    shared_scorer_flags,
    user_errors,
)

GPUS_OPTION = typer.Option(
    None, "--gpus", help="GPUs to price the run on, e.g. H100-SXM,L4 (default H100-SXM,A100-80GB,L4)."
)
SAMPLE_OPTION = typer.Option(64, "--sample", help="Pairs whose prompts are tokenized to count tokens per pair.")


def plan(
    inputs: list[str] = typer.Argument(None, help="Shards: paths, globs, {a..b} brace patterns or fsspec URLs."),
    recipe: Optional[Path] = typer.Option(None, help="YAML recipe with ScoreConfig fields; flags override it."),
    scorer: list[str] = SCORER_OPTION,
    model: Optional[str] = MODEL_OPTION,
    metrics: Optional[str] = METRICS_OPTION,
    readout: Optional[str] = READOUT_OPTION,
    template: Optional[str] = TEMPLATE_OPTION,
    conversation: Optional[str] = CONVERSATION_OPTION,
    backend: Optional[str] = typer.Option(None, help="MLM judge backend: transformers (default), vllm or openai."),
    device: Optional[str] = DEVICE_OPTION,
    dtype: Optional[str] = DTYPE_OPTION,
    batch_size: Optional[int] = BATCH_SIZE_OPTION,
    allow_random_fallback: Optional[bool] = typer.Option(
        None, "--allow-random-fallback", help="If the model cannot be found, count with a tiny random stand-in."
    ),
    option: list[str] = SCORER_SETTING_OPTION,
    gpus: Optional[str] = GPUS_OPTION,
    sample: int = SAMPLE_OPTION,
    allow_pipe: bool = typer.Option(False, "--allow-pipe", help="Allow `pipe:CMD` inputs (runs shell commands)."),
    image_column: Optional[str] = IMAGE_COLUMN_OPTION,
    caption_column: Optional[str] = CAPTION_COLUMN_OPTION,
    uid_column: Optional[str] = UID_COLUMN_OPTION,
    url_column: Optional[str] = URL_COLUMN_OPTION,
    captions_file: Optional[str] = CAPTIONS_FILE_OPTION,
    verbose: bool = VERBOSE_OPTION,
    json_output: bool = typer.Option(False, "--json", help="Print the plan as one JSON object on stdout."),
) -> None:
    """What scoring INPUTS with these scorers will cost: pairs, tokens, vision passes, GPU hours. Nothing is scored."""
    shared = shared_scorer_flags(locals())
    setup_logging(verbose)
    with user_errors():
        fields: dict[str, Any] = load_recipe(recipe) if recipe else {}
    if inputs:
        fields["inputs"] = inputs
    if scorer or any(v is not None for v in shared.values()) or option:
        names = scorer or [s if isinstance(s, str) else s["name"] for s in fields.get("scorers", ["mlm"])]
        with user_errors():
            fields["scorers"] = build_scorer_specs(names, shared, option or [])
    columns = read_flags(image_column, caption_column, uid_column, url_column, captions_file)
    if columns:
        fields["read"] = {**(fields.get("read") or {}), **columns}
    if "inputs" not in fields:
        raise typer.BadParameter("give INPUTS (or a --recipe that has them)")
    fields.setdefault("scorers", [{"name": "mlm"}])  # the judge is what a plan is for
    show_plan(fields, gpus, sample, allow_pipe, json_output)


def show_plan(fields: dict[str, Any], gpus: str | None, sample: int, allow_pipe: bool, json_output: bool) -> None:
    """Plan the scoring ``fields`` describe (ScoreConfig fields; the output folder is not needed) and print it."""
    from mlmfilter import api

    fields = {**fields, "output": fields.get("output") or ""}
    with user_errors():
        result = api.plan(config=api.ScoreConfig(**fields), gpus=gpus, sample=sample, allow_pipe=allow_pipe)
    if json_output:
        print_json(result.to_json())
    else:
        print_plan(result)


def print_plan(result) -> None:
    from rich.markup import escape
    from rich.table import Table

    data = result.to_json()
    pairs = data["pairs"]
    if pairs["pairs"] is None:
        counted = (
            f"unknown: none of the {pairs['shards']} shards can be counted without reading it (remote or compressed)"
        )
    else:
        how = "estimated" if pairs["estimated"] else "counted"
        counted = (
            f"{pairs['pairs']:,} ({how}: {pairs['counted_shards']} of {pairs['shards']} shards counted from "
            "headers, footers or _stats.json)"
        )
    console.print(f"[bold]plan[/] for {', '.join(data['inputs'])}: {pairs['shards']} shards, pairs {counted}")
    for item in data["scorers"]:
        table = Table(title=f"scorer {item['scorer']}" + (f" ({item['model']})" if item.get("model") else ""))
        table.add_column("what")
        table.add_column("per pair", justify="right")
        table.add_column("whole run", justify="right")
        total = (lambda x: f"{x:,.0f}") if pairs["pairs"] is not None else (lambda x: "?")
        n = pairs["pairs"] or 0
        table.add_row("vision passes", f"{item['vision_passes']:g}", total(item["vision_passes"] * n))
        if item["scorer"] == "mlm":
            table.add_row("LLM tokens", f"{item['llm_tokens']:,.0f}", total(item["llm_tokens"] * n))
            if item.get("llm_tokens_per_metric_pass") is not None:
                per = item["llm_tokens_per_metric_pass"]
                table.add_row("LLM tokens, one pass per metric (released script)", f"{per:,.0f}", total(per * n))
            if item.get("flops"):
                table.add_row("model FLOPs", f"{item['flops'] / 1e12:.2f} T", total(item["flops"] * n / 1e12) + " T")
        console.print(table)
        if item["scorer"] == "mlm":
            console.print(
                f"  metrics {', '.join(item['metrics'])}; tokens: {escape(item['tokens_from'])}", soft_wrap=True
            )
        for name, hours in (item.get("gpu_hours") or {}).items():
            console.print(f"  {name}: {_hours(hours['hours'])} ({hours['basis']})")
        for note in item["notes"]:
            console.print(f"  [yellow]{escape(note)}[/]", soft_wrap=True)
    console.print("nothing was scored")


def _hours(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.1f} s"
    if hours < 1:
        return f"{hours * 60:.1f} min"
    return f"{hours:,.1f} h"


def verify(
    run: str = typer.Argument(..., help="A scored run folder."),
    stage: str = typer.Option("score", help="The scoring stage to verify."),
    sample: int = typer.Option(16, help="Pairs re-scored."),
    seed: int = typer.Option(0, help="Seed of the sample."),
    backend: Optional[str] = typer.Option(None, help="Also re-score on this backend (vllm, openai)."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="The openai backend's server."),
    device: Optional[str] = DEVICE_OPTION,
    verbose: bool = VERBOSE_OPTION,
    json_output: bool = typer.Option(False, "--json", help="Print the report as one JSON object on stdout."),
) -> None:
    """Re-score a sample of RUN at batch size 1 and in fp32 (and on --backend); exit 1 if a metric moves
    beyond the readout bound recorded in its provenance."""
    from rich.table import Table

    from mlmfilter import api

    setup_logging(verbose)
    with user_errors():
        report = api.verify(
            run, stage=stage, sample=sample, seed=seed, backend=backend, base_url=base_url, device=device
        )
    if json_output:
        print_json(report.to_json())
    else:
        table = Table(title=f"verify {run} ({report.sampled} pairs re-scored, readout {report.readout})")
        table.add_column("metric")
        table.add_column("bound", justify="right")
        for check in report.checks:
            table.add_column(f"max |diff| {check.replace('_', ' ')}", justify="right")
        table.add_column("ok")
        for metric in report.metrics:
            cells = [
                f"{metric.differences[c]:.3g}" if metric.differences[c] is not None else "-" for c in report.checks
            ]
            table.add_row(metric.metric, f"{metric.bound:.3g}", *cells, "yes" if metric.ok else "[red]NO[/]")
        console.print(table)
        console.print(f"readout bound (provenance): {report.readout_bound}", soft_wrap=True, highlight=False)
        for note in report.notes:
            console.print(f"[yellow]{note}[/]")
        console.print(
            "verified: every metric within its bound" if report.ok else "[red]a metric moved beyond its bound[/]"
        )
    if not report.ok:
        raise typer.Exit(1)
