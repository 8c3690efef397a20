"""`mlmfilter embed`, `mlmfilter dedup`, `mlmfilter distill`: embeddings kept once, and what rests on them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mlmfilter.cli.common import (
    CAPTION_COLUMN_OPTION,
    CAPTIONS_FILE_OPTION,
    IMAGE_COLUMN_OPTION,
    UID_COLUMN_OPTION,
    URL_COLUMN_OPTION,
    VERBOSE_OPTION,
    console,
    exit_if_interrupted,
    options_or_exit,
    print_json,
    read_flags,
    setup_logging,
    user_errors,
)


def embed(
    arguments: list[str] = typer.Argument(
        None,
        metavar="RUN [INPUTS]...",
        help="The run folder, then shards to embed into it (default: the run's own shards). "
        "With -o RUN, every argument is an input.",
    ),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="The run folder (as `score -o`)."),
    model: str = typer.Option(
        "openai/clip-vit-base-patch32", help="CLIP / SigLIP hub id or folder, or open_clip:ARCH/PRETRAINED."
    ),
    text_model: Optional[str] = typer.Option(
        None, help="clip (the model's text tower; default), minilm, or a sentence-transformers folder."
    ),
    text_only: bool = typer.Option(
        False, "--text-only", help="Caption embeddings only (MiniLM, real weights bundled); no image model."
    ),
    hashes: bool = typer.Option(True, "--hashes/--no-hashes", help="Image byte digest + perceptual hash (dedup)."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("auto", help="The model's dtype: auto, fp32, bf16, fp16 (stored vectors are fp16)."),
    batch_size: int = typer.Option(64, help="Pairs per forward."),
    allow_random_fallback: bool = typer.Option(
        False, "--allow-random-fallback", help="If the model cannot be found, use a tiny random one (meaningless)."
    ),
    stage: str = typer.Option("embed", help="Stage folder in the run."),
    workers: int = typer.Option(1, help="Shards embedded in parallel."),
    decode_workers: int = typer.Option(1, help="Image-decoding processes per shard worker."),
    image_column: Optional[str] = IMAGE_COLUMN_OPTION,
    caption_column: Optional[str] = CAPTION_COLUMN_OPTION,
    uid_column: Optional[str] = UID_COLUMN_OPTION,
    url_column: Optional[str] = URL_COLUMN_OPTION,
    captions_file: Optional[str] = CAPTIONS_FILE_OPTION,
    allow_pipe: bool = typer.Option(False, "--allow-pipe", help="Allow `pipe:CMD` inputs (runs shell commands)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard this stage's earlier embeddings."),
    verbose: bool = VERBOSE_OPTION,
    json_output: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
) -> None:
    """Keep each pair's image + text embeddings (fp16, L2-normalised) and image hashes in the run.

    What `dedup`, `distill`, `teach sample RUN` and the report read. Re-running resumes.
    """
    from mlmfilter import api
    from mlmfilter.cli.score import print_score_summary
    from mlmfilter.io.readers import ReadOptions

    setup_logging(verbose)
    arguments = list(arguments or [])
    if output is None and not arguments:
        raise typer.BadParameter("give the run folder: mlmfilter embed RUN [INPUTS]... (or INPUTS... -o RUN)")
    run, inputs = (output, arguments) if output is not None else (arguments[0], arguments[1:])
    read = options_or_exit(
        ReadOptions, **read_flags(image_column, caption_column, uid_column, url_column, captions_file)
    )
    with user_errors():
        summary = api.embed(
            run,
            inputs or None,
            model=model,
            text_model=text_model,
            text_only=text_only,
            hashes=hashes,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            allow_random_fallback=allow_random_fallback,
            stage=stage,
            workers=workers,
            decode_workers=decode_workers,
            read=read,
            allow_pipe=allow_pipe,
            overwrite=overwrite,
            show_progress=True,
        )
    if json_output:
        print_json(summary.to_json())
        for warning in summary.provenance.get("warnings", []):
            console.print(f"[bold red]{warning}[/]")
    else:
        print_score_summary(summary)
        console.print(f"embeddings kept in {summary.run_dir}/{summary.stage}")
    exit_if_interrupted(summary)
    if not summary.ok:
        raise typer.Exit(1)


def dedup(
    run: str = typer.Argument(..., metavar="RUN", help="A run whose embeddings are kept (`mlmfilter embed`)."),
    threshold: float = typer.Option(0.95, help="Cosine at or above which two pairs of a cluster are duplicates."),
    on: Optional[str] = typer.Option(None, help="image (default when kept) or text embeddings."),
    keep_best: Optional[str] = typer.Option(
        None, "--keep-best", help="Keep the pair with the highest value of this column per group (else the first uid)."
    ),
    exact: bool = typer.Option(True, "--exact/--no-exact", help="Same image bytes / same pixels (perceptual hash)."),
    semantic: Optional[bool] = typer.Option(
        None,
        "--semantic/--no-semantic",
        help="SemDeDup over the embeddings (default: unless they are random stand-ins).",
    ),
    phash_bits: int = typer.Option(4, help="Perceptual hashes this many bits apart (of 64) are the same picture."),
    clusters: Optional[int] = typer.Option(
        None, help="k of k-means (default: sqrt(pairs); one cluster up to 10000 pairs)."
    ),
    spill_margin: float = typer.Option(
        0.02,
        help="A pair is also compared in its second-nearest cluster when that centroid is this close in cosine: "
        "higher finds more duplicates split by a cluster border, at more comparisons (docs/benchmarks.md).",
    ),
    seed: int = typer.Option(0),
    embeddings: Optional[str] = typer.Option(None, "--embeddings", help="The stage keeping the embeddings."),
    stage: str = typer.Option("dedup", help="Stage folder the groups are written to."),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Dedup the embedded shards only."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a dedup stage made with other settings."),
    verbose: bool = VERBOSE_OPTION,
    json_output: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
) -> None:
    """Find duplicate groups (same bytes, same pixels, SemDeDup) and keep one pair of each.

    Writes RUN/<stage> (dup_group, dup_size, dup_keep, dup_reason, dup_nearest_uid, dup_nearest_cosine);
    select with it: `mlmfilter select RUN --where 'dup_keep and itm >= 60'`.
    """
    from rich.markup import escape

    from mlmfilter import api

    setup_logging(verbose)
    with user_errors():
        summary = api.dedup(
            run,
            threshold=threshold,
            on=on,
            keep_best=keep_best,
            exact=exact,
            semantic=semantic,
            phash_bits=phash_bits,
            clusters=clusters,
            seed=seed,
            spill_margin=spill_margin,
            embeddings_stage=embeddings,
            stage=stage,
            allow_incomplete=allow_incomplete,
            overwrite=overwrite,
        )
    if json_output:
        print_json(summary.to_json())
    else:
        print_dedup_summary(summary)
    for note in summary.notes:
        console.print(f"[yellow]{escape(note)}[/]", soft_wrap=True)
    for warning in summary.warnings:
        console.print(f"[bold red]{warning}[/]")
    if summary.warnings and summary.settings.get("options", {}).get("semantic"):
        console.print(
            "[bold red]The semantic groups above come from RANDOM stand-in embeddings: they mean nothing. "
            "Exact duplicates (same bytes, same pixels) are real.[/]"
        )


def print_dedup_summary(summary) -> None:
    from rich.table import Table

    data = summary.to_json()
    table = Table(title=f"dedup {summary.run_dir} -> stage {summary.stage}", show_header=False)
    table.add_row("pairs", f"{data['pairs']} ({data['compared']} compared)")
    table.add_row("duplicate groups", str(data["groups"]))
    reasons = ", ".join(f"{k}: {v}" for k, v in data["by_reason"].items()) or "none"
    table.add_row("removed", f"{data['removed']} ({reasons})")
    table.add_row("kept", str(data["kept"]))
    settings = data["settings"]
    options = settings["options"]
    table.add_row(
        "settings",
        f"on {settings['on']} embeddings, cosine >= {options['threshold']}, "
        f"{data['stats'].get('clusters', 0)} clusters, phash within {options['phash_bits']} bits",
    )
    for group in data["largest"][:3]:
        table.add_row("largest group", f"{group['size']} pairs ({group['reason']}), kept {group['kept_uid']}")
    table.add_row("wall time", f"{data['seconds']:.1f} s")
    console.print(table)
    from mlmfilter.runs.read import RunReader

    # select reads the score stage and joins this one; a run without scores selects from this one
    stage = "" if "score" in RunReader(summary.run_dir).stages() else f" --stage {summary.stage}"
    console.print(
        f"select with: mlmfilter select {summary.run_dir}{stage} --where 'dup_keep'", highlight=False, soft_wrap=True
    )


def distill(
    run: str = typer.Argument(..., metavar="RUN", help="A run with kept embeddings and a judge's scores on a sample."),
    metrics: Optional[str] = typer.Option(None, help="Judge columns to predict, e.g. ctq or itm,odf (default: all)."),
    judge_stage: Optional[str] = typer.Option(None, "--judge-stage", help="Stage with the judge's scores."),
    embeddings: Optional[str] = typer.Option(None, "--embeddings", help="The stage keeping the embeddings."),
    form: str = typer.Option("ridge", "--head", help="ridge or mlp (2-layer)."),
    holdout: float = typer.Option(0.2, help="Share of the judged pairs held out to measure the head."),
    top_fraction: float = typer.Option(0.3, help="The selection the overlap and the cascade are measured on."),
    threshold: Optional[float] = typer.Option(None, help="The judge's cut (default: the top fraction's)."),
    decide_by: Optional[str] = typer.Option(None, "--decide-by", help="Metric the cascade decides on."),
    agreement: float = typer.Option(0.95, help="Wanted agreement of the cascade with an all-judge selection."),
    seed: int = typer.Option(0),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Head folder (default RUN/heads/<stage>)."),
    stage: str = typer.Option("distill", help="Stage folder of the pool's predictions."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo the predictions of an earlier head."),
    verbose: bool = VERBOSE_OPTION,
    json_output: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout."),
) -> None:
    """Distil the judge into a head over the embeddings: held-out agreement, the cascade's band, predictions.

    Saves the head (reload: `score --scorer distilled --model HEAD`) and writes RUN/<stage>
    (distilled_<metric> for every pair).
    """
    from mlmfilter import api
    from mlmfilter.training.distill import DistillOptions

    setup_logging(verbose)
    options = options_or_exit(
        DistillOptions,
        metrics=[m.strip() for m in metrics.split(",") if m.strip()] if metrics else None,
        judge_stage=judge_stage,
        embeddings_stage=embeddings,
        form=form,
        holdout=holdout,
        top_fraction=top_fraction,
        threshold=threshold,
        decide_by=decide_by,
        agreement=agreement,
        seed=seed,
    )
    with user_errors():
        result = api.distill(run, options, output=output, stage=stage, overwrite=overwrite, show_progress=True)
    if json_output:
        print_json(result.to_json())
    else:
        print_distill_result(result, top_fraction)
    for warning in result.warnings:
        console.print(f"[bold red]{warning}[/]")
    if not result.predicted.get("ok", True):
        raise typer.Exit(130 if result.predicted.get("interrupted") else 1)


def print_distill_result(result, top_fraction: float) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"head {result.head_dir}: held-out agreement with the judge ({result.heldout} pairs)")
    for column in ("metric", "Spearman", f"top {top_fraction:.0%} overlap", "mean abs error"):
        table.add_column(column)
    for report in result.reports:
        table.add_row(report.metric, _fmt(report.spearman), _fmt(report.top_overlap), _fmt(report.mae))
    console.print(table)
    console.print(
        f"fitted on {result.trained} of {result.judged} judged pairs; predictions for the pool in stage {result.stage!r}",
        highlight=False,
    )
    cascade = result.cascade
    if cascade is not None:
        console.print(
            f"cascade on {cascade.metric} (judge keeps {cascade.metric} >= {cascade.judge_cut:g}): the head alone agrees "
            f"{cascade.head_only_agreement:.1%}; judging {cascade.judge_fraction:.1%} of the pool "
            f"reaches {cascade.agreement:.1%} agreement",
            highlight=False,
        )
        if cascade.band is not None:
            column = f"distilled_{cascade.metric}"
            lo, hi = (f"{v:.6g}" for v in cascade.band)
            run = result.run_dir
            console.print(
                escape(
                    f"judge the band:  mlmfilter score RUN_INPUTS -o {run} --scorer mlm --metrics {cascade.metric} "
                    f"--stage judge_band --only '{column} >= {lo} and {column} <= {hi}' --only-stage {result.stage}\n"
                    f"then select:     mlmfilter select {run} --stage {result.stage} --where '{column} > {hi}' -o sel_head && "
                    f"mlmfilter select {run} --stage judge_band --where '{cascade.metric} >= {cascade.judge_cut:g}' "
                    "--union sel_head/uids.npy -o sel"
                ),
                highlight=False,
                soft_wrap=True,
            )
    for note in result.notes:
        console.print(f"[yellow]{escape(note)}[/]", soft_wrap=True)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
