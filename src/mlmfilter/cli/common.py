"""What every command shares: the console, one way to end on a user's mistake, logging, ``--json``
output, the recipe file, scorer specs from flags, the shared typer options, and help pages a user
can read.

Help pages: typer (0.2x) prints the Python type of every parameter (``<list[str]>``, ``<bool>``,
``<str>``) in its help pages; those tags mean nothing to a curator. :func:`plain_type_labels` makes
typer show the parameter's own metavar, a name-based one, the choices, or nothing for flags and
arguments (whose name is already shown), and hides the "default: no-flag" line of off-by-default
switches.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, TypeVar

import typer
from rich.console import Console

#: mlmfilter's own messages, tables and progress go to stderr; stdout carries only ``--json`` output
console = Console(stderr=True)

Model = TypeVar("Model")


# -- ending on a user's mistake ---------------------------------------------------------------------


def print_error(message: str) -> None:
    """``error: MESSAGE`` on the console, on one line whatever the terminal width (logs and greps see it whole)."""
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Mistakes in the input or the flags end with one clear line (exit 2), not a traceback."""
    from mlmfilter.core.errors import ModelUnavailableError

    try:
        yield
    except (ValueError, FileNotFoundError, ModelUnavailableError, ImportError) as exc:
        # ImportError: an optional extra or an fsspec backend (s3fs, gcsfs) is missing; its message says which
        logging.getLogger("mlmfilter").debug("user error", exc_info=True)
        print_error(str(exc))
        raise typer.Exit(2) from exc
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        # a full disk or a read-only folder is not a bug: one line naming the file (what was written is cleaned up)
        logging.getLogger("mlmfilter").debug("storage error", exc_info=True)
        print_error(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
        raise typer.Exit(1) from exc


#: errors of the storage itself, not of mlmfilter: full disk, quota, read-only filesystem, no permission
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def options_or_exit(model: type[Model], /, **fields: Any) -> Model:
    """A command's Options model from its flags; a value the model refuses ends the command with one
    line naming the field (``decision.margin: Input should be ...``, exit 2)."""
    from pydantic import ValidationError

    from mlmfilter.core.errors import validation_message

    try:
        return model(**fields)
    except ValidationError as exc:
        logging.getLogger("mlmfilter").debug("invalid options", exc_info=True)
        print_error(validation_message(exc))
        raise typer.Exit(2) from None


# -- logging and output -----------------------------------------------------------------------------


def setup_logging(verbose: bool) -> None:
    """mlmfilter's log lines on the console; third-party warnings and download bars only with ``-v``."""
    from rich.logging import RichHandler

    from mlmfilter.cli.quiet import quiet_third_party

    handler = RichHandler(console=console, show_path=False)
    quiet_third_party(handler, verbose)  # library warnings and download bars: RUN/logs only, unless -v
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler])


def print_json(summary: dict[str, Any]) -> None:
    """``--json``: the summary as one JSON object on stdout; everything else stays on stderr."""
    sys.stdout.write(json.dumps(summary, default=str) + "\n")
    sys.stdout.flush()


# -- from flags to settings -------------------------------------------------------------------------


def load_recipe(path: str | Path) -> dict[str, Any]:
    """``--recipe FILE``: a YAML mapping of the command's settings (flags given beside it override them)."""
    import fsspec
    import yaml

    fs, where = fsspec.core.url_to_fs(str(path))  # a local path or any fsspec URL, taken as given
    if not fs.isfile(where):
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist")
    data = yaml.safe_load(fs.cat_file(where).decode("utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping of ScoreConfig fields")
    return data


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


def shared_scorer_flags(parameters: dict[str, Any]) -> dict[str, Any]:
    """The shared scorer flags among a command's parameters (its ``locals()``), given or not."""
    return {name: parameters[name] for name in SHARED_SCORER_FLAGS if name in parameters}


def build_scorer_specs(names: list[str], shared: dict[str, Any], options: list[str]) -> list[dict[str, Any]]:
    """Scorer specs from `--scorer a,b`, the shared flags and `--option scorer.key=value` overrides.

    Each shared flag goes to every requested scorer whose Options model has that field."""
    import yaml

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
        matching[0]["options"][key] = yaml.safe_load(value)  # numbers, booleans and lists as a recipe reads them
    return specs


# -- shared typer options ---------------------------------------------------------------------------

# the input-column flags of every command that reads a pool (score, teach sample)
VERBOSE_HELP = "Debug messages, and third-party warnings and download bars (hidden otherwise; always in RUN/logs)."
INPUT_PANEL = "Input columns (found by name in any case when not given)"
IMAGE_COLUMN_HELP = (
    "Column with the image bytes or image file paths (parquet, captions table); in tars the image extension."
)
CAPTION_COLUMN_HELP = "Column with the caption, e.g. TEXT (LAION); in tars the caption extension."
UID_COLUMN_HELP = "Column with the pair's uid (else derived from shard and key)."
URL_COLUMN_HELP = "Column with the image URL (kept as metadata)."
CAPTIONS_FILE_HELP = "Image folders: the captions table inside the folder (default captions.jsonl or metadata.jsonl)."

# the same flags as typer options, shared by the commands that take them
VERBOSE_OPTION = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP)
IMAGE_COLUMN_OPTION = typer.Option(
    None, "--image-column", metavar="NAME", help=IMAGE_COLUMN_HELP, rich_help_panel=INPUT_PANEL
)
CAPTION_COLUMN_OPTION = typer.Option(
    None, "--caption-column", metavar="NAME", help=CAPTION_COLUMN_HELP, rich_help_panel=INPUT_PANEL
)
UID_COLUMN_OPTION = typer.Option(
    None, "--uid-column", metavar="NAME", help=UID_COLUMN_HELP, rich_help_panel=INPUT_PANEL
)
URL_COLUMN_OPTION = typer.Option(
    None, "--url-column", metavar="NAME", help=URL_COLUMN_HELP, rich_help_panel=INPUT_PANEL
)
CAPTIONS_FILE_OPTION = typer.Option(
    None, "--captions-file", metavar="FILE", help=CAPTIONS_FILE_HELP, rich_help_panel=INPUT_PANEL
)

# the scorer flags of `mlmfilter score`, shared by `eval human` and `eval corrupt`
SCORER_OPTION = typer.Option(None, "--scorer", "-s", help="Scorers, e.g. rules,clip or mlm.")
MODEL_OPTION = typer.Option(None, help="Model hub id or local path for the model scorer.")
METRICS_OPTION = typer.Option(None, help="MLM metrics, e.g. itm,odf,ctq,su.")
READOUT_OPTION = typer.Option(None, help="MLM readout: expected (default) or generate.")
TEMPLATE_OPTION = typer.Option(None, help="MLM prompt template: v2, v1 or a custom string.")
CONVERSATION_OPTION = typer.Option(None, help="MLM conversation format: auto, vicuna_v1, llama3, qwen.")
DEVICE_OPTION = typer.Option(None, help="cpu, cuda, cuda:1 ...")
DTYPE_OPTION = typer.Option(None, help="auto, fp32, bf16, fp16.")
BATCH_SIZE_OPTION = typer.Option(None, help="Scorer batch size.")
SCORER_SETTING_OPTION = typer.Option(None, help="Any scorer option: scorer.key=value (repeatable).")

# -- help pages a user can read ---------------------------------------------------------------------

_TYPE_METAVARS = {"int": "N", "float": "NUMBER", "path": "PATH", "file": "FILE", "directory": "DIR", "dir": "DIR"}


def _label(param: Any, ctx: Any, original) -> str | None:
    from typer.core import TyperArgument

    if isinstance(param, TyperArgument):
        return None  # its name (or metavar) is already shown beside it
    if param.metavar is not None:
        return param.metavar or None
    if getattr(param, "is_flag", False) or getattr(param, "is_bool_flag", False):
        return None  # a switch takes no value
    label = (original(param, ctx) or "").strip("<>")
    repeatable = label.startswith("list[")
    inner = label[len("list[") : -1] if repeatable else label
    if inner == "bool":
        return None
    if "|" in inner:  # choices: keep them, they are the documentation
        return inner
    return _TYPE_METAVARS.get(inner.lower()) or (param.name or "value").upper()


def plain_type_labels() -> None:
    """Install the plain labels (once per process; typer builds its click commands per call)."""
    from typer import core

    if getattr(core, "_mlmfilter_plain_labels", False):
        return
    original = core._TyperParameter.display_type_rich

    def display_type_rich(self, ctx):
        return _label(self, ctx, original)

    core.TyperArgument.display_type_rich = display_type_rich
    core.TyperOption.display_type_rich = display_type_rich

    original_default = core.TyperOption._extract_default_help_str

    def extract_default(self, *, ctx):
        if getattr(self, "is_bool_flag", False) and not self.default and self.secondary_opts:
            return None  # "--overwrite [default: no-overwrite]" says nothing
        return original_default(self, ctx=ctx)

    core.TyperOption._extract_default_help_str = extract_default
    core._mlmfilter_plain_labels = True
