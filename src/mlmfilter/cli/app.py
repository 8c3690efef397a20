"""`mlmfilter` command line: a thin layer that turns flags into calls of :mod:`mlmfilter.api`."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from mlmfilter.cli.common import (  # the input-column flags are shared with `teach sample`
    CAPTION_COLUMN_OPTION,
    CAPTIONS_FILE_OPTION,
    IMAGE_COLUMN_OPTION,
    UID_COLUMN_OPTION,
    URL_COLUMN_OPTION,
    VERBOSE_OPTION,
    plain_type_labels,
)

plain_type_labels()  # metavars in --help, not Python type tags
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from mlmfilter import __version__

        print(f"mlmfilter {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Score, select and repair image-text pairs for vision-language pretraining."""


@contextmanager
def user_errors():
    """Mistakes in the input or the flags end with one clear line (exit 2), not a traceback."""
    from mlmfilter.core.errors import ModelUnavailableError

    try:
        yield
    except (ValueError, FileNotFoundError, ModelUnavailableError, ImportError) as exc:
        # ImportError: an optional extra or an fsspec backend (s3fs, gcsfs) is missing; its message says which
        logging.getLogger("mlmfilter").debug("user error", exc_info=True)
        from rich.markup import escape

        # soft_wrap: one line whatever the terminal width, so logs and greps see it whole
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from exc


#: flags shared by the scorers; each goes to every requested scorer whose Options has that field
SHARED_SCORER_FLAGS = (
    "model",
    "device",
    "dtype",
    "batch_size",
    "metrics",
    "readout",
    "template",
    "conversation",
    "allow_random_fallback",
    "backend",
)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    from mlmfilter.cli.quiet import quiet_third_party

    handler = RichHandler(console=console, show_path=False)
    quiet_third_party(handler, verbose)  # library warnings and download bars: RUN/logs only, unless -v
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler])


def build_scorer_specs(names: list[str], shared: dict[str, Any], options: list[str]) -> list[dict[str, Any]]:
    """Scorer specs from `--scorer a,b`, the shared flags and `--option scorer.key=value` overrides."""
    from mlmfilter.scorers import scorer_class

    specs = []
    for name in [n.strip() for group in names for n in group.split(",") if n.strip()]:
        fields = scorer_class(name).Options.model_fields
        opts = {k: v for k, v in shared.items() if v is not None and k in fields}
        specs.append({"name": name, "options": opts})
    for item in options:
        target, _, value = item.partition("=")
        scorer_name, _, key = target.partition(".")
        if not value or not key:
            raise typer.BadParameter(f"--option takes scorer.key=value, got {item!r}")
        matching = [s for s in specs if s["name"] == scorer_name]
        if not matching:
            raise typer.BadParameter(f"--option {item!r}: scorer {scorer_name!r} is not requested")
        matching[0]["options"][key] = _parse_value(value)
    return specs


def with_base_url(specs: list, base_url: str) -> list:
    """`--base-url` goes to the MLM judge's backend settings (``backend_options.base_url``)."""
    out, found = [], False
    for spec in specs:
        spec = {"name": spec, "options": {}} if isinstance(spec, str) else dict(spec)
        if spec["name"] == "mlm":
            found = True
            options = dict(spec.get("options") or {})
            options["backend_options"] = {**(options.get("backend_options") or {}), "base_url": base_url}
            spec["options"] = options
        out.append(spec)
    if not found:
        raise typer.BadParameter("--base-url is for the MLM judge's openai backend: add --scorer mlm --backend openai")
    return out


def read_flags(
    image_column: Optional[str],
    caption_column: Optional[str],
    uid_column: Optional[str],
    url_column: Optional[str],
    captions_file: Optional[str],
) -> dict[str, str]:
    """The input-column flags that were given, as ReadOptions fields (the `read:` block of a recipe)."""
    given = dict(
        image_column=image_column,
        caption_column=caption_column,
        uid_column=uid_column,
        url_column=url_column,
        captions_file=captions_file,
    )
    return {k: v for k, v in given.items() if v is not None}


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)  # numbers, booleans and lists as a YAML recipe would read them


@app.command()
def score(
    inputs: list[str] = typer.Argument(None, help="Shards: paths, globs, {a..b} brace patterns or fsspec URLs."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder (resumable)."),
    recipe: Optional[Path] = typer.Option(None, help="YAML recipe with ScoreConfig fields; flags override it."),
    scorer: list[str] = typer.Option(None, "--scorer", "-s", help="Scorers, e.g. rules,clip or mlm."),
    model: Optional[str] = typer.Option(None, help="Model hub id or local path for the model scorer."),
    metrics: Optional[str] = typer.Option(None, help="MLM metrics, e.g. itm,odf,ctq,su."),
    readout: Optional[str] = typer.Option(None, help="MLM readout: expected (default) or generate."),
    template: Optional[str] = typer.Option(None, help="MLM prompt template: v2, v1 or a custom string."),
    conversation: Optional[str] = typer.Option(None, help="MLM conversation format: auto, vicuna_v1, llama3, qwen."),
    backend: Optional[str] = typer.Option(
        None, help="MLM judge backend: transformers (default), vllm (GPU) or openai (a server)."
    ),
    base_url: Optional[str] = typer.Option(
        None, "--base-url", help="With --backend openai: the server, e.g. http://127.0.0.1:8000/v1."
    ),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ..."),
    dtype: Optional[str] = typer.Option(None, help="auto, fp32, bf16, fp16."),
    batch_size: Optional[int] = typer.Option(None, help="Scorer batch size."),
    allow_random_fallback: Optional[bool] = typer.Option(
        None,
        "--allow-random-fallback",
        help="If the model cannot be found, use a tiny random one (scores are meaningless).",
    ),
    option: list[str] = typer.Option(None, help="Any scorer option: scorer.key=value (repeatable)."),
    workers: Optional[int] = typer.Option(None, help="Shards scored in parallel."),
    decode_workers: Optional[int] = typer.Option(None, help="Image-decoding processes per shard worker."),
    stage: Optional[str] = typer.Option(
        None, help="Stage name in the run folder (default score); another name adds a second scoring."
    ),
    only: Optional[str] = typer.Option(
        None, help="Cascade: score only pairs passing this expression over --only-stage (others are marked skipped)."
    ),
    only_stage: Optional[str] = typer.Option(None, help="Stage whose columns --only reads (default score)."),
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
) -> None:
    """Score image-text pairs into a run folder. Re-running the same command resumes."""
    from mlmfilter import api
    from mlmfilter.config import ScoreConfig, load_recipe

    _setup_logging(verbose)
    with user_errors():  # a missing recipe file
        fields: dict[str, Any] = load_recipe(recipe) if recipe else {}
    if inputs:
        fields["inputs"] = inputs
    if output:
        fields["output"] = str(output)
    shared = dict(
        model=model,
        metrics=metrics,
        readout=readout,
        template=template,
        conversation=conversation,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        allow_random_fallback=allow_random_fallback,
        backend=backend,
    )
    if scorer or any(v is not None for v in shared.values()) or option:
        names = scorer or [s if isinstance(s, str) else s["name"] for s in fields.get("scorers", ["rules"])]
        with user_errors():  # an unknown scorer name
            fields["scorers"] = build_scorer_specs(names, shared, option or [])
    if base_url is not None:
        fields["scorers"] = with_base_url(fields.get("scorers") or [], base_url)
    for key, value in (
        ("workers", workers),
        ("decode_workers", decode_workers),
        ("stage", stage),
        ("only", only),
        ("only_stage", only_stage),
    ):
        if value is not None:
            fields[key] = value
    if executor is not None:
        fields["executor"] = executor
    if ray_address is not None:
        fields["ray"] = {**(fields.get("ray") or {}), "address": ray_address}
    columns = read_flags(image_column, caption_column, uid_column, url_column, captions_file)
    if allow_absolute_paths:
        columns["allow_absolute_paths"] = True
    if columns:  # flags override the recipe's `read:` block field by field
        fields["read"] = {**(fields.get("read") or {}), **columns}
    if "inputs" not in fields or "output" not in fields:
        raise typer.BadParameter("give INPUTS and --output (or a --recipe that has them)")
    if _names_a_hub_model(fields.get("scorers") or []):
        from mlmfilter.models.hub import go_offline_if_unreachable

        if go_offline_if_unreachable():
            logging.getLogger("mlmfilter").info(
                "the Hugging Face hub is not reachable: models load from the local cache only"
            )
    with user_errors():
        summary = api.score(
            config=ScoreConfig(**fields),
            overwrite=overwrite,
            allow_pipe=allow_pipe,
            show_progress=True,
            partition=partition,
        )
    if json_output:
        import dataclasses

        print_json({**dataclasses.asdict(summary), "ok": summary.ok})
        for warning in summary.provenance.get("warnings", []):  # loud on stderr too: random weights
            console.print(f"[bold red]{warning}[/]")
    else:
        print_score_summary(summary)
    if summary.interrupted:
        console.print(
            f"interrupted: {summary.stats['shards_done']} of {summary.shards_total} shards done; "
            "re-run the same command to resume"
        )
        raise typer.Exit(130)
    if not summary.ok:
        raise typer.Exit(1)


def _names_a_hub_model(scorers: list) -> bool:
    """True when a model scorer is asked for (by default or by a name that is not a local path)."""
    from mlmfilter.models.hub import names_a_local_path

    model_scorers = {"clip", "mlm", "aitqe"}
    for spec in scorers:
        name = spec if isinstance(spec, str) else spec.get("name")
        model = None if isinstance(spec, str) else (spec.get("options") or {}).get("model")
        local = bool(model) and (names_a_local_path(str(model)) or Path(str(model)).expanduser().exists())
        if name in model_scorers and not local:
            return True
    return False


def print_score_summary(summary) -> None:
    stats = summary.stats
    table = Table(title=f"run {summary.run_dir}", show_header=False)
    if summary.shards_skipped and not summary.shards_completed and not summary.shards_failed:
        shards = f"{len(summary.shards_skipped)} of {summary.shards_total} already done"
    else:
        shards = (
            f"{len(summary.shards_completed) + len(summary.shards_skipped)}/{summary.shards_total} done "
            f"({len(summary.shards_skipped)} resumed, {len(summary.shards_failed)} failed)"
        )
    table.add_row("shards", shards)
    table.add_row("pairs read", str(stats["read"]))
    table.add_row("scored", str(stats["ok"]))
    table.add_row("errors", ", ".join(f"{k}: {v}" for k, v in stats["errors"].items()) or "none")
    table.add_row("wall time", f"{summary.seconds:.1f} s")
    console.print(table)
    for warning in summary.provenance.get("warnings", []):
        console.print(f"[bold red]{warning}[/]")
    from rich.markup import escape

    for note in summary.notes:  # escaped: a hint lists columns as [a, b], which rich would take for markup
        console.print(f"[yellow]{escape(note)}[/]", soft_wrap=True)  # one line: logs and greps see it whole
    for shard, error in summary.shards_failed.items():
        console.print(f"[red]shard {shard} failed:[/] {error}")


@app.command()
def select(
    runs: list[str] = typer.Argument(
        ...,
        metavar="RUN",
        help="Run folders written by `mlmfilter score`; several are joined on uid. NAME=RUN prefixes that run's columns with NAME_.",
    ),
    where: Optional[str] = typer.Option(None, "--where", "-w", help="Expression, e.g. 'itm >= 66 and odf >= 20'."),
    top_fraction: Optional[float] = typer.Option(None, help="Keep this fraction of all pairs, best first."),
    by: Optional[str] = typer.Option(None, help="Column ranked by --top-fraction."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Selection folder (default RUN/selection; needed with several runs)."
    ),
    stage: str = typer.Option("score", help="Scoring stage of the runs to select from."),
    allow_incomplete: bool = typer.Option(
        False, "--allow-incomplete", help="Select although some shards are not done."
    ),
    intersect: list[Path] = typer.Option(
        None, "--intersect", help="Keep only uids also in this .npy uid list (repeatable)."
    ),
    union: list[Path] = typer.Option(
        None, "--union", help="Also keep the pool's pairs whose uid is in this .npy uid list (repeatable)."
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
) -> None:
    """Select pairs: writes uids.npy (DataComp subset), kept.parquet and selection.json."""
    from mlmfilter import api
    from mlmfilter.selection.join import parse_run_arguments

    with user_errors():
        parsed = parse_run_arguments(runs)
        result = api.select(
            parsed[0] if len(parsed) == 1 else parsed,
            output,
            expression=where,
            top_fraction=top_fraction,
            by=by,
            stage=stage,
            allow_incomplete=allow_incomplete,
            intersect=intersect or [],
            union=union or [],
        )
    if json_output:
        print_json(result.to_json())
    else:
        console.print(result.summary(), highlight=False)


def print_json(summary: dict[str, Any]) -> None:
    """``--json``: the summary as one JSON object on stdout; everything else stays on stderr."""
    import sys

    sys.stdout.write(json.dumps(summary, default=str) + "\n")
    sys.stdout.flush()


@app.command()
def reshard(
    selection: Path = typer.Argument(..., help="Selection folder written by `mlmfilter select`."),
    output: Path = typer.Argument(..., help="Folder for the new WebDataset shards."),
    samples_per_shard: int = typer.Option(10_000, help="Pairs per output shard."),
    captions: Optional[Path] = typer.Option(None, help="Parquet with uid and a replacement caption column."),
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
        replacement = None
        if captions:
            import pyarrow.parquet as pq

            table = pq.read_table(captions, columns=["uid", caption_column])
            replacement = {u: c for u, c in zip(table["uid"].to_pylist(), table[caption_column].to_pylist()) if c}
        stats = api.reshard(
            selection,
            output,
            samples_per_shard=samples_per_shard,
            captions=replacement,
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


@app.command()
def demo(
    output: Path = typer.Argument(Path("mlmfilter-demo"), help="Folder for the sample shards, run and selection."),
    mlm: bool = typer.Option(True, help="Also run the MLM judge (a tiny random stand-in offline)."),
) -> None:
    """Score and select the bundled sample data (built from photos that ship with scikit-image & co)."""
    from mlmfilter.demo.run import run_demo

    _setup_logging(False)
    run_demo(output, with_mlm=mlm, console=console)


@app.command("scorers")
def list_scorers() -> None:
    """List every scorer with its options (defaults) and output columns."""
    from mlmfilter.scorers import REGISTRY, scorer_class

    table = Table(show_lines=True)
    for col in ("scorer", "options (default)", "columns"):
        table.add_column(col, overflow="fold")
    for name in sorted(REGISTRY):
        try:
            cls = scorer_class(name)
        except ImportError as exc:  # an optional extra is missing
            table.add_row(name, f"unavailable: {exc}", "")
            continue
        options = "\n".join(f"{k} = {f.default!r}" for k, f in cls.Options.model_fields.items())
        columns = (
            ", ".join(getattr(cls, "columns", {}) or {})
            if isinstance(getattr(cls, "columns", None), dict)
            else "(depend on options)"
        )
        table.add_row(name, options, columns or "(depend on options)")
    Console().print(table)


#: modules under mlmfilter.cli that add their commands to `app` (each has ``register(app)``);
#: a command module's import must stay cheap: heavy imports go inside the command functions
COMMAND_MODULES: list[str] = ["report", "convert", "train", "enhance", "teach", "evaluate"]


def _register_command_modules() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"mlmfilter.cli.{name}").register(app)


_register_command_modules()

if __name__ == "__main__":
    app()
