"""`mlmfilter teach ...`: build MLM-Filter instruction data from a pool with a teacher (mlmfilter.teach)."""

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
    options_or_exit,
    print_error,
    read_flags,
    setup_logging,
    user_errors,
)

teach_app = typer.Typer(
    no_args_is_help=True, help="Build judge instruction data: sample, negatives, label, balance, export."
)


ALLOW_INCOMPLETE_HELP = (
    "Go on although some pairs have no label (an interrupted or failed `teach label`); the gaps are recorded."
)


def _warn_incomplete(gaps: Optional[dict]) -> None:
    if gaps:
        console.print(
            f"[yellow]incomplete: {gaps['missing']} of {gaps['expected']} labels are missing "
            f"({', '.join(f'{k}: {v}' for k, v in gaps['by_table'].items())})[/]",
            highlight=False,
        )


def _split(text: Optional[str]) -> Optional[list[str]]:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


@teach_app.command("sample")
def sample(
    pool: list[str] = typer.Argument(
        ...,
        help="Pool shards (paths, globs, brace patterns or fsspec URLs), or a run folder: its shards, and its "
        "kept embeddings (`mlmfilter embed`) instead of an encoder pass.",
    ),
    output: str = typer.Option(..., "--output", "-o", help="The teach folder."),
    n: int = typer.Option(10_000, "--n", help="Pairs to pick (MLM-Filter: 10k from CC12M)."),
    clusters: Optional[int] = typer.Option(None, help="k of k-means (default: ceil(n / 10))."),
    seed: int = typer.Option(0),
    encoder: str = typer.Option("minilm", help="minilm (caption text, offline all-MiniLM-L6-v2) or clip (images)."),
    encoder_model: Optional[str] = typer.Option(
        None, help="Local sentence-encoder folder, or the CLIP model for --encoder clip."
    ),
    rules: bool = typer.Option(False, "--rules/--no-rules", help="Pre-filter with DataComp's basic rules."),
    embedding_dtype: str = typer.Option(
        "float16", help="float16 or float32: OUTPUT/embeddings.npy, read back as a memmap."
    ),
    device: str = typer.Option("cpu", help="Where the encoder runs (cpu, cuda, ...)."),
    image_column: Optional[str] = IMAGE_COLUMN_OPTION,
    caption_column: Optional[str] = CAPTION_COLUMN_OPTION,
    uid_column: Optional[str] = UID_COLUMN_OPTION,
    url_column: Optional[str] = URL_COLUMN_OPTION,
    captions_file: Optional[str] = CAPTIONS_FILE_OPTION,
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Pick diverse pairs: embed, k-means, sample evenly across clusters."""
    from mlmfilter import api
    from mlmfilter.io.readers import ReadOptions
    from mlmfilter.teach.sample import SampleOptions

    setup_logging(verbose)
    options = options_or_exit(
        SampleOptions,
        n=n,
        clusters=clusters,
        seed=seed,
        encoder=encoder,
        encoder_model=encoder_model,
        rules=rules,
        embedding_dtype=embedding_dtype,
        device=device,
    )
    read = options_or_exit(
        ReadOptions, **read_flags(image_column, caption_column, uid_column, url_column, captions_file)
    )
    with user_errors():
        report = api.teach_sample(pool, output, options, read=read)["report"]
    console.print(
        f"picked {report['picked']} of {report['usable']} usable pairs ({report['read']} read) "
        f"from {report['clusters']} clusters -> {Path(output) / 'sample.parquet'}"
    )


@teach_app.command("negatives")
def negatives(
    folder: str = typer.Argument(..., help="The teach folder (after `teach sample`)."),
    kinds: Optional[str] = typer.Option(None, help="Comma-separated corruption kinds (default: all)."),
    seed: int = typer.Option(0),
    rewrites: bool = typer.Option(
        True,
        "--rewrites/--no-rewrites",
        help="Also the enhancement task's samples: an unrelated caption -> the pair's own, "
        "a poor caption -> the teacher's rewrite (asked for by `teach label`).",
    ),
) -> None:
    """Make tagged low-quality variants of the sampled pairs (labelled by the teacher like any pair)."""
    from mlmfilter import api

    with user_errors():
        info = api.teach_negatives(folder, _split(kinds), seed, rewrites=rewrites)
    console.print(f"{info['negatives']} negatives from {info['from_pairs']} pairs: {info['per_kind']}")
    if "rewrites" in info:
        console.print(f"{info['rewrites']['samples']} rewrite samples: {info['rewrites']['per_kind']}")


@teach_app.command("label")
def label(
    folder: str = typer.Argument(..., help="The teach folder (after `teach sample`, optionally `teach negatives`)."),
    model: str = typer.Option(..., help="The teacher model, as the endpoint names it."),
    base_url: str = typer.Option(
        "https://api.openai.com/v1", help="OpenAI-compatible endpoint (vLLM, SGLang, transformers serve ...)."
    ),
    metrics: str = typer.Option("all", help="itm,odf,ctq,su or all."),
    template: str = typer.Option("v2", help="Prompt template: v2, v1 or a custom string."),
    mode: str = typer.Option("image", help="image (the teacher sees the image) or text (it sees a VLM's description)."),
    describer_model: Optional[str] = typer.Option(
        None, help="Text mode: the VLM that describes the images (default: --model)."
    ),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="Environment variable holding the API key."),
    api_key_file: Optional[str] = typer.Option(None, help="File holding the key (bare, or YAML/JSON with api_key)."),
    concurrency: int = typer.Option(8, help="Requests in flight at once."),
    timeout: float = typer.Option(120.0, help="Per-request timeout, seconds."),
    max_retries: int = typer.Option(5, help="Retries on 429 / 5xx / timeouts (retry-after honoured)."),
    max_tokens: int = typer.Option(512),
    temperature: float = typer.Option(0.0),
    batch_file: Optional[str] = typer.Option(
        None, help="Write OpenAI Batch JSONL request files here instead of sending."
    ),
    collect: Optional[list[str]] = typer.Option(
        None, help="Batch output file(s) to ingest; then label from them only."
    ),
    rewrite_prompt: Optional[str] = typer.Option(
        None,
        metavar="FILE",
        help="Text file: the prompt asking for the poor captions' rewrites (has {caption}; default: the enhancer's).",
    ),
    rewrite_max_tokens: Optional[int] = typer.Option(None, metavar="N", help="Token limit of a rewrite answer."),
    relabel: bool = typer.Option(
        False,
        "--relabel",
        help="Label again from scratch, also with other settings or re-made pairs than before "
        "(answers already in the request cache cost nothing).",
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Print the requests, tokens and API cost (with and without the Batch API); send nothing.",
    ),
    price: Optional[str] = typer.Option(
        None,
        metavar="IN,OUT",
        help="--dry-run: USD per 1M input and output tokens (for a model without a recorded price).",
    ),
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Ask the teacher for a score line and a rationale per pair and metric (cached: never asked twice)."""
    from mlmfilter import api
    from mlmfilter.clients.chat import ClientOptions
    from mlmfilter.teach.folder import TeachRunFailed
    from mlmfilter.teach.label import LabelOptions

    setup_logging(verbose)
    with user_errors():
        from mlmfilter.core.locations import local_path

        prompt_file = local_path(rewrite_prompt, "--rewrite-prompt") if rewrite_prompt else None
        rewrite = {"rewrite_prompt": prompt_file.read_text(encoding="utf-8")} if prompt_file else {}
    if rewrite_max_tokens is not None:
        rewrite["rewrite_max_tokens"] = rewrite_max_tokens
    options = options_or_exit(
        LabelOptions,
        model=model,
        metrics=_split(metrics) or ["all"],
        template=template,
        mode=mode,
        describer_model=describer_model,
        max_tokens=max_tokens,
        temperature=temperature,
        **rewrite,
    )
    with user_errors():
        options.resolved_metrics()  # an unknown metric name
    if dry_run:
        print_label_plan(folder, options, price)
        return
    client = options_or_exit(
        ClientOptions,
        base_url=base_url,
        api_key_env=api_key_env,
        api_key_file=str(api_key_file) if api_key_file else None,
        concurrency=concurrency,
        timeout_s=timeout,
        max_retries=max_retries,
        cache_only=bool(collect),
    )
    with user_errors():
        if collect:
            ingested = api.teach_collect(folder, collect)
            console.print(
                f"collected {ingested['stored']} answers from {ingested['lines']} output lines "
                f"({ingested['failed']} without an answer)"
            )
        if batch_file is not None:
            files = api.teach_write_batch(folder, options, client, batch_file)
            console.print(f"wrote {len(files)} batch file(s): " + ", ".join(map(str, files)))
            return
        try:
            info = api.teach_label(folder, options, client, relabel=relabel)  # Ctrl-C: Interrupted, exit 130
        except TeachRunFailed as exc:  # the shards' tracebacks are in the run's logs
            print_error(str(exc))
            raise typer.Exit(1) from None
    stats = info["stats"]
    if "rewrites" in info:
        rewrites = info["rewrites"]
        console.print(
            f"{rewrites['samples']} rewrite samples ({rewrites['ok']} ok, errors {rewrites['errors'] or 'none'})"
        )
    console.print(
        f"{info['rows']} labels ({info['ok']} ok, errors {info['errors'] or 'none'}); requests {stats['requests']}, "
        f"cache hits {stats['cache_hits']}, retries {stats['retries']}, tokens "
        f"{stats['prompt_tokens']}+{stats['completion_tokens']}"
    )
    total = info.get("total") or stats
    if total != stats:  # an earlier run asked too: what the folder's labels cost in all
        console.print(
            f"all runs: requests {total['requests']}, cache hits {total['cache_hits']}, retries {total['retries']}, "
            f"tokens {total['prompt_tokens']}+{total['completion_tokens']}"
        )
    _exit_if_unanswered(info)


def _exit_if_unanswered(info: dict) -> None:
    """Labels (or rewrites) the teacher never answered (failed requests, after their retries) make the run
    a failure, exit 1: the folder is not completely labelled, and a re-run asks only for what is missing."""
    from mlmfilter.teach.stage import RETRYABLE

    unanswered = {k: v for k, v in info["errors"].items() if k in RETRYABLE}
    rewrites = {k: v for k, v in (info.get("rewrites") or {}).get("errors", {}).items() if k in RETRYABLE}
    if not unanswered and not rewrites:
        return
    what = []
    if unanswered:
        what.append(f"{sum(unanswered.values())} of {info['rows']} labels ({_counts(unanswered)})")
    if rewrites:
        what.append(f"{sum(rewrites.values())} rewrites ({_counts(rewrites)})")
    print_error(
        f"no answer from the teacher at {info['client']['base_url']} for {' and '.join(what)}; "
        "re-run the same command to ask again (answers received are cached)"
    )
    raise typer.Exit(1)


def _counts(counts: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items())


@teach_app.command("balance")
def balance(
    folder: str = typer.Argument(..., help="The teach folder (after `teach label`)."),
    target: int = typer.Option(1000, help="Labels to keep per metric."),
    bins: int = typer.Option(10, help="Equal-width score bins over 0..100."),
    seed: int = typer.Option(0),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help=ALLOW_INCOMPLETE_HELP),
) -> None:
    """Sample evenly across score bins per metric; print histograms before and after."""
    from mlmfilter import api
    from mlmfilter.teach.balance import BalanceOptions, bin_edges

    options = options_or_exit(BalanceOptions, target=target, bins=bins, seed=seed)
    with user_errors():
        report = api.teach_balance(folder, options, allow_incomplete=allow_incomplete)
    _warn_incomplete(report.get("incomplete_labels"))
    for metric, info in report["metrics"].items():
        console.print(balance_table(metric, info, bin_edges(options)))


def balance_table(metric: str, info: dict, edges: list[float]):
    """One metric's labels per score bin, before and after balancing, as bars people can read."""
    from rich import box
    from rich.table import Table

    from mlmfilter.report.terminal import bar

    peak = max([*info["before"], 1])
    table = Table(
        title=f"{metric}: kept {info['kept']} of {info['labelled']} labels", box=box.SIMPLE_HEAD, title_justify="left"
    )
    table.add_column("score", justify="right")
    table.add_column("labelled", justify="right")
    table.add_column("kept", justify="right")
    table.add_column("", no_wrap=True)
    for i, (before, after) in enumerate(zip(info["before"], info["after"])):  # bins [a, b), the last [a, b]
        table.add_row(f"{edges[i]:g} to {edges[i + 1]:g}", str(before), str(after), bar(after / peak, 30))
    return table


@teach_app.command("export")
def export(
    folder: str = typer.Argument(..., help="The teach folder (after `teach balance`, or --all-labels)."),
    output: str = typer.Option(
        ..., "--output", "-o", help="Export folder: LLaVA JSON, TRL JSONL, images, dataset card."
    ),
    mix: Optional[str] = typer.Option(None, help="A general LLaVA instruction set to mix in."),
    mix_ratio: Optional[float] = typer.Option(
        None, help="General records per quality record (46k:4k = 11.5); default all."
    ),
    all_labels: bool = typer.Option(False, "--all-labels", help="Export every parsed label, not the balanced set."),
    image_folder: str = typer.Option(
        "mlm_filter_images", help="Image subfolder (paths in the JSON are relative to OUTPUT)."
    ),
    rewrites: bool = typer.Option(
        True, "--rewrites/--no-rewrites", help="Include the enhancement task's rewrite samples."
    ),
    seed: int = typer.Option(0),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help=ALLOW_INCOMPLETE_HELP),
) -> None:
    """Write the instruction set (MLM-Filter's LLaVA JSON + images, TRL prompt-completion JSONL) and its card."""
    from mlmfilter import api
    from mlmfilter.teach.export import ExportOptions

    options = options_or_exit(
        ExportOptions,
        image_folder=image_folder,
        mix=str(mix) if mix else None,
        mix_ratio=mix_ratio,
        seed=seed,
        rewrites=rewrites,
    )
    with user_errors():
        summary = api.teach_export(folder, output, options, balanced=not all_labels, allow_incomplete=allow_incomplete)
    console.print(
        f"{summary['records']} records ({summary['quality_records']} quality, {summary['rewrite_records']} rewrite, "
        f"{summary['general_records']} general), "
        f"{summary['images']} images -> {output}"
    )
    _warn_incomplete(summary.get("incomplete_labels"))


def print_label_plan(folder: Path, options, price: str | None) -> None:
    """`teach label --dry-run`: what labelling the folder will ask and cost; nothing is sent."""
    from rich.table import Table

    from mlmfilter import api

    with user_errors():
        prices = None
        if price is not None:
            parts = [float(p) for p in price.split(",")]
            if len(parts) != 2:
                raise ValueError("--price takes IN,OUT: USD per 1M input and per 1M output tokens")
            prices = (parts[0], parts[1])
        plan = api.plan_teach_label(folder, options, price=prices)
    table = Table(title=f"teach label {folder} with {options.model} (nothing sent)")
    for column in ("requests", "count", "input tokens", "output tokens (assumed)", "output tokens (max)"):
        table.add_column(column, justify="left" if column == "requests" else "right")
    for kind in plan.kinds:
        table.add_row(
            kind.kind,
            f"{kind.requests:,}",
            f"{kind.input_tokens:,}",
            f"{kind.output_tokens:,}",
            f"{kind.output_tokens_max:,}",
        )
    table.add_row("total", f"{plan.requests:,}", f"{plan.input_tokens:,}", f"{plan.output_tokens:,}", "")
    console.print(table)
    console.print(f"tokens: {plan.tokens_from}; images by OpenAI's high-detail tile rule", highlight=False)
    if plan.price is not None:
        console.print(
            f"API cost: ${plan.cost():,.2f} (up to ${plan.cost(worst=True):,.2f}); with the Batch API: "
            f"${plan.cost(batch=True):,.2f} (up to ${plan.cost(batch=True, worst=True):,.2f}) "
            f"at ${plan.price[0]:g} / ${plan.price[1]:g} per 1M input / output tokens",
            highlight=False,
        )
    for note in plan.notes:
        console.print(f"[yellow]{note}[/]")
