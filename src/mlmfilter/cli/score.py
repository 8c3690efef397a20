"""`mlmfilter score` (pairs into a run folder) and `mlmfilter scorers` (what each scorer takes and writes)."""

from __future__ import annotations

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
    exit_if_interrupted,
    load_recipe,
    options_or_exit,
    print_json,
    read_flags,
    setup_logging,
    shared_scorer_flags,
    user_errors,
)


def score(
    inputs: list[str] = typer.Argument(None, help="Shards: paths, globs, {a..b} brace patterns or fsspec URLs."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Run folder (resumable): a path or fsspec URL."),
    recipe: Optional[str] = typer.Option(None, help="YAML recipe with ScoreConfig fields; flags override it."),
    scorer: list[str] = SCORER_OPTION,
    model: Optional[str] = MODEL_OPTION,
    metrics: Optional[str] = METRICS_OPTION,
    readout: Optional[str] = READOUT_OPTION,
    template: Optional[str] = TEMPLATE_OPTION,
    conversation: Optional[str] = CONVERSATION_OPTION,
    backend: Optional[str] = typer.Option(
        None, help="MLM judge backend: transformers (default), vllm (GPU) or openai (a server)."
    ),
    base_url: Optional[str] = typer.Option(
        None, "--base-url", help="With --backend openai: the server, e.g. http://127.0.0.1:8000/v1."
    ),
    device: Optional[str] = DEVICE_OPTION,
    dtype: Optional[str] = DTYPE_OPTION,
    batch_size: Optional[int] = BATCH_SIZE_OPTION,
    allow_random_fallback: Optional[bool] = typer.Option(
        None,
        "--allow-random-fallback",
        help="If the model cannot be found, use a tiny random one (scores are meaningless).",
    ),
    option: list[str] = SCORER_SETTING_OPTION,
    workers: Optional[int] = typer.Option(None, help="Shards scored in parallel, one process each.", show_default="1"),
    decode_workers: Optional[int] = typer.Option(None, help="Image-decoding processes per shard worker."),
    stage: Optional[str] = typer.Option(
        None, help="Stage name in the run folder (default score); another name adds a second scoring."
    ),
    only: Optional[str] = typer.Option(
        None, help="Cascade: score only pairs passing this expression over --only-stage (others are marked skipped)."
    ),
    only_stage: Optional[str] = typer.Option(None, help="Stage whose columns --only reads (default score)."),
    sample: Optional[str] = typer.Option(
        None, help="Score only a seeded random share of the pairs (0.01 or 1%); the others are marked skipped."
    ),
    sample_seed: Optional[int] = typer.Option(None, help="Seed of --sample (default 0)."),
    allow_pipe: bool = typer.Option(False, "--allow-pipe", help="Allow `pipe:CMD` inputs (runs shell commands)."),
    allow_absolute_paths: bool = typer.Option(
        False, "--allow-absolute-paths", help="Let image-path columns name files outside the dataset's folder, or URLs."
    ),
    image_column: Optional[str] = IMAGE_COLUMN_OPTION,
    caption_column: Optional[str] = CAPTION_COLUMN_OPTION,
    uid_column: Optional[str] = UID_COLUMN_OPTION,
    url_column: Optional[str] = URL_COLUMN_OPTION,
    captions_file: Optional[str] = CAPTIONS_FILE_OPTION,
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard an earlier run in the output folder."),
    partition: Optional[str] = typer.Option(
        None, help="i/N: score job i's share of the inputs; N such jobs (a Slurm array) fill one run folder."
    ),
    executor: Optional[str] = typer.Option(None, help="local (default) or ray: shards over a Ray cluster's actors."),
    ray_address: Optional[str] = typer.Option(
        None, help="With --executor ray: join this cluster (auto, ray://host:10001); else a local Ray starts."
    ),
    verbose: bool = VERBOSE_OPTION,
    json_output: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print what the run would cost (`mlmfilter plan`) and score nothing."
    ),
) -> None:
    """Score image-text pairs into a run folder. Re-running the same command resumes."""
    from mlmfilter import api

    shared = shared_scorer_flags(locals())
    setup_logging(verbose)
    with user_errors():  # a missing recipe file
        fields: dict[str, Any] = load_recipe(recipe) if recipe else {}
    given = dict(inputs=inputs or None, output=str(output) if output else None, workers=workers)
    given.update(decode_workers=decode_workers, stage=stage, only=only, only_stage=only_stage, executor=executor)
    given.update(sample=parse_share(sample) if sample is not None else None, sample_seed=sample_seed)
    fields.update({key: value for key, value in given.items() if value is not None})
    if scorer or any(v is not None for v in shared.values()) or option:
        names = scorer or [s if isinstance(s, str) else s["name"] for s in fields.get("scorers", ["rules"])]
        with user_errors():  # an unknown scorer name
            fields["scorers"] = build_scorer_specs(names, shared, option or [])
    if ray_address is not None:
        fields["ray"] = {**(fields.get("ray") or {}), "address": ray_address}
    columns = read_flags(image_column, caption_column, uid_column, url_column, captions_file)
    if allow_absolute_paths:
        columns["allow_absolute_paths"] = True
    if columns:  # flags override the recipe's `read:` block field by field
        fields["read"] = {**(fields.get("read") or {}), **columns}
    if dry_run:  # the same settings, planned: nothing is written or scored
        from mlmfilter.cli.plan import show_plan

        if "inputs" not in fields:
            raise typer.BadParameter("give INPUTS (or a --recipe that has them)")
        show_plan(fields, None, 64, allow_pipe, json_output)
        return
    if "inputs" not in fields or "output" not in fields:
        raise typer.BadParameter("give INPUTS and --output (or a --recipe that has them)")
    config = options_or_exit(api.ScoreConfig, **fields)  # a misspelt recipe setting: one line, "did you mean"
    with user_errors():
        summary = api.score(
            config=config,
            base_url=base_url,
            overwrite=overwrite,
            allow_pipe=allow_pipe,
            show_progress=True,
            partition=partition,
        )
    if json_output:
        print_json(summary.to_json())
        for warning in summary.provenance.get("warnings", []):  # loud on stderr too: random weights
            console.print(f"[bold red]{warning}[/]")
    else:
        print_score_summary(summary)
    exit_if_interrupted(summary)
    if not summary.ok:
        raise typer.Exit(1)


def parse_share(text: str) -> float:
    """``--sample``: a fraction (0.01) or a percentage (1%)."""
    value = text.strip()
    try:
        share = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise typer.BadParameter(f"--sample takes a fraction (0.01) or a percentage (1%), got {text!r}") from None
    if not 0 < share <= 1:
        raise typer.BadParameter(f"--sample {text!r}: the share must be above 0 and at most 1 (100%)")
    return share


def print_score_summary(summary) -> None:
    """The human summary of a scoring: shards, pairs, errors, time; then warnings, hints and failures."""
    from rich.markup import escape
    from rich.table import Table

    whole = summary.stats.to_json()
    # this job's shards (a partition, or some of a run's inputs): the folder's total is shown apart
    stats = summary.job_stats.to_json() if summary.job_stats is not None else whole
    table = Table(title=f"run {summary.run_dir}", show_header=False)
    if summary.shards_skipped and not summary.shards_completed and not summary.shards_failed:
        shards = f"{len(summary.shards_skipped)} of {summary.shards_total} already done"
    else:
        shards = (
            f"{len(summary.shards_completed) + len(summary.shards_skipped)}/{summary.shards_total} done "
            f"({len(summary.shards_skipped)} resumed, {len(summary.shards_failed)} failed)"
        )
    if summary.shards_unusable:
        shards += f", {len(summary.shards_unusable)} with no usable pair"
    table.add_row("shards", shards)
    table.add_row("pairs read", str(stats["read"]))
    # rows without an error, left unscored on purpose: the cascade's --only, the --sample share
    skipped = {
        k[len("skipped_by_") :]: int(v) for k, v in stats["counters"].items() if k.startswith("skipped_by_") and v
    }
    table.add_row("scored", str(stats["ok"] - sum(skipped.values())))
    why = {"cascade": "did not pass --only", "sample": "outside the --sample share"}
    if skipped:
        table.add_row(
            "skipped", ", ".join(f"{n} ({why.get(k, k)})" for k, n in skipped.items()) + "; marked skipped, not scored"
        )
    table.add_row("errors", ", ".join(f"{k}: {v}" for k, v in stats["errors"].items()) or "none")
    if whole["shards"] != stats["shards"]:
        table.add_row("run folder", f"{whole['read']} pairs in {whole['shards']} shards (every job so far)")
    table.add_row("wall time", f"{summary.seconds:.1f} s")
    console.print(table)
    if summary.shards_total == 0:
        console.print(
            "[yellow]nothing to do: this job holds no input shard (--partition splits the shards by a hash "
            "of their url; with fewer shards than jobs, some jobs get none)[/]",
            soft_wrap=True,
        )
    for warning in summary.provenance.get("warnings", []):
        console.print(f"[bold red]{warning}[/]")
    for note in summary.notes:  # escaped: a hint lists columns as [a, b], which rich would take for markup
        console.print(f"[yellow]{escape(note)}[/]", soft_wrap=True)  # one line: logs and greps see it whole
    for shard, error in summary.shards_failed.items():
        console.print(f"[red]shard {shard} failed:[/] {error}")
    if summary.shards_unusable:
        console.print(
            f"[red]{len(summary.shards_unusable)} shard(s) gave no usable pair[/] (the lines above say why)",
            soft_wrap=True,
        )


def list_scorers() -> None:
    """List every scorer with its options (defaults) and output columns."""
    from rich.console import Console
    from rich.table import Table

    from mlmfilter import api

    table = Table(show_lines=True)
    for col in ("scorer", "options (default)", "columns"):
        table.add_column(col, overflow="fold")
    for scorer in api.list_scorers():
        if scorer["unavailable"]:
            table.add_row(scorer["name"], f"unavailable: {scorer['unavailable']}", "")
            continue
        options = "\n".join(f"{k} = {default!r}" for k, default in scorer["options"].items())
        table.add_row(scorer["name"], options, ", ".join(scorer["columns"] or []) or "(depend on options)")
    Console().print(table)
