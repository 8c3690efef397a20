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
from typing import Any, Iterator, NoReturn, Optional, TypeVar

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
    from pydantic import ValidationError

    from mlmfilter.core.errors import ModelUnavailableError, credentials_problem

    try:
        yield
    except ValidationError as exc:  # settings built below the command: one line, never pydantic's page
        logging.getLogger("mlmfilter").debug("invalid settings", exc_info=True)
        print_error(validation_line(exc))
        raise typer.Exit(2) from None
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
        if exc.errno in (
            errno.ENOSPC,
            errno.EDQUOT,
        ):  # the machine's, not the user's: the run resumes once there is room
            where = f" ({exc.filename})" if exc.filename else ""
            print_error(f"No space left on device{where}: free some space and re-run the same command to resume")
        else:
            print_error(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
        raise typer.Exit(1) from exc
    except Exception as exc:
        problem = credentials_problem(exc)
        if problem is None:
            raise
        logging.getLogger("mlmfilter").debug("no credentials", exc_info=True)
        print_error(problem)
        raise typer.Exit(2) from exc


#: errors of the storage itself, not of mlmfilter: full disk, quota, read-only filesystem, no permission
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


#: the exit status of a command stopped by Ctrl-C (SIGINT), as a shell reports it: 128 + 2
INTERRUPTED_EXIT = 130


def exit_interrupted(line: str) -> NoReturn:
    """Print what an interrupted command did and how to go on (one line), then exit 130."""
    console.print(line, highlight=False, soft_wrap=True)
    raise typer.Exit(INTERRUPTED_EXIT)


@contextmanager
def interruptible(then: str = "re-run the same command") -> Iterator[None]:
    """Ctrl-C inside the block ends the command with exit 130 and one line: the ``Interrupted`` the work
    raised says what was done (``interrupted: 24 of 96 labels done; re-run ...``); a bare interrupt says ``then``."""
    from mlmfilter.core.errors import Interrupted

    try:
        yield
    except Interrupted as exc:
        exit_interrupted(exc.line())
    except KeyboardInterrupt:
        exit_interrupted(f"interrupted; {then}")


def exit_if_interrupted(summary: Any) -> None:
    """A stage run's summary that was interrupted: which of its shards are done, exit 130."""
    if summary.interrupted:
        exit_interrupted(
            f"interrupted: {summary.stats.shards} of {summary.shards_total} shards done; "
            "re-run the same command to resume"
        )


def options_or_exit(model: type[Model], /, flag_names: dict[str, str] | None = None, **fields: Any) -> Model:
    """A command's Options model from its flags (or a recipe); a value the model refuses ends the command
    with one line naming the flag or field (``--margin: Input should be greater than or equal to 0 (got
    -10.0)``; a misspelt setting with the one it resembles), exit 2. ``flag_names``: field path -> the flag
    that sets it, for the message."""
    from pydantic import ValidationError

    try:
        return model(**fields)
    except ValidationError as exc:
        logging.getLogger("mlmfilter").debug("invalid options", exc_info=True)
        print_error(validation_line(exc, model, flag_names))
        raise typer.Exit(2) from None


def validation_line(exc: Any, model: Any = None, flags: dict[str, str] | None = None) -> str:
    """A pydantic ``ValidationError`` as one line a user can act on, never pydantic's page with its URL:
    ``unknown setting 'worker' (did you mean 'workers'?)``, ``read: unknown setting 'caption_colum' (did
    you mean 'caption_column'?)``, ``decision.margin: Input should be greater than or equal to 0 (got -10.0)``.
    ``model`` (the pydantic class validated) lets a misspelt name be matched against the settings there."""
    import difflib

    problems = []
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc") or () if not isinstance(part, int)]
        if error.get("type") == "extra_forbidden" and loc:
            name, parent = loc[-1], loc[:-1]
            known = _fields_at(model, parent)
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6) if known else []
            hint = f" (did you mean {close[0]!r}?)" if close else (f"; known: {', '.join(known)}" if known else "")
            where = f"{'.'.join(parent)}: " if parent else ""
            problems.append(f"{where}unknown setting {name!r}{hint}")
            continue
        given = error.get("input")
        got = f" (got {given!r})" if isinstance(given, (int, float, str, bool)) and len(repr(given)) <= 60 else ""
        where = ".".join(loc)
        where = (flags or {}).get(where, where)
        problems.append(f"{where}: {error['msg']}{got}" if where else f"{error['msg']}{got}")
    return "; ".join(problems)


def _fields_at(model: Any, path: list[str]) -> list[str]:
    """The setting names of the pydantic model reached from ``model`` along ``path`` ([] when unknown)."""
    import typing

    from pydantic import BaseModel

    def models_in(annotation: Any) -> list[type[BaseModel]]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in typing.get_args(annotation) for m in models_in(arg)]

    current = model
    for part in path:
        if current is None:
            return []
        field = current.model_fields.get(part)
        found = models_in(field.annotation) if field is not None else []
        current = found[0] if found else None
    return sorted(current.model_fields) if current is not None else []


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
    try:
        data = yaml.safe_load(fs.cat_file(where).decode("utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:  # python tags are refused, never built
        raise ValueError(f"{path}: not a YAML recipe ({' '.join(str(exc).split())})") from None
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

    Each shared flag goes to every requested scorer whose Options model has that field, except ``--model``:
    it names one model, so it goes to the one model scorer not given its own by ``--option NAME.model=``;
    with two such scorers (``clip`` and ``mlm``) it is refused with the options that name each."""
    import yaml

    from mlmfilter.scorers import scorer_class

    requested = [_scorer_name(n) for group in names for n in group.split(",") if n.strip()]
    model_flag = shared.get("model")
    if model_flag is not None:
        named = {item.partition("=")[0].partition(".")[0] for item in options if ".model=" in item}
        takers = [n for n in requested if scorer_class(n).model_option == "model" and n not in named]
        if len(takers) > 1:
            each = " ".join(f"--option {n}.model=MODEL" for n in takers)
            raise ValueError(
                f"--model names one model, but {' and '.join(takers)} each load their own: name each with {each} "
                "(--model then goes to the one left, if any)"
            )
    specs = []
    for name in requested:
        fields = scorer_class(name).Options.model_fields
        opts = {k: v for k, v in shared.items() if v is not None and k in fields}
        specs.append({"name": name, "options": opts})
    for item in options:
        target, _, value = item.partition("=")
        scorer_name, _, key = target.partition(".")
        if not value or not key:
            raise typer.BadParameter(f"--option takes scorer.key=value, got {item!r}")
        matching = [s for s in specs if s["name"] == _scorer_name(scorer_name)]
        if not matching:
            raise typer.BadParameter(f"--option {item!r}: scorer {scorer_name!r} is not requested")
        try:  # numbers, booleans and lists as a recipe reads them; python tags are refused, never built
            matching[0]["options"][key] = yaml.safe_load(value)
        except (yaml.YAMLError, RecursionError) as exc:
            raise ValueError(f"--option {item!r}: the value is not plain YAML ({' '.join(str(exc).split())})") from None
    return specs


def _scorer_name(name: str) -> str:
    """``CLIP`` is ``clip``: scorer names in any case, as the registry spells them."""
    from mlmfilter.scorers import REGISTRY

    folded = name.strip().lower()
    return folded if folded in REGISTRY else name.strip()


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
# Their defaults are the scorers' own (a recipe may set them too), so the flags default to None and say the
# real defaults in show_default; tests/cli check these texts against the scorers' Options models.
SCORER_OPTION = typer.Option(
    None,
    "--scorer",
    "-s",
    help="Scorers, comma-separated: rules, clip, mlm, aitqe, ocr (`mlmfilter scorers` lists their options).",
    show_default="rules",
)
MODEL_OPTION = typer.Option(
    None,
    help="Model hub id or local path of THE model scorer; two (clip and mlm): --option clip.model=... "
    "--option mlm.model=... instead.",
    show_default="each scorer's own: clip openai/clip-vit-base-patch32, mlm weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o, "
    "aitqe HymanH/AITQE",
)
METRICS_OPTION = typer.Option(
    None,
    help="MLM metrics: itm, odf, ctq, su. Each is one judge request per pair: all four cost 4x one metric, 2x itm,odf.",
    show_default="itm,odf,ctq,su",
)
READOUT_OPTION = typer.Option(None, help="MLM readout: expected (default) or generate.")
TEMPLATE_OPTION = typer.Option(None, help="MLM prompt template: v2, v1 or a custom string.")
CONVERSATION_OPTION = typer.Option(None, help="MLM conversation format: auto, vicuna_v1, llama3, qwen.")
DEVICE_OPTION = typer.Option(None, help="cpu, cuda, cuda:1 ...")
DTYPE_OPTION = typer.Option(None, help="auto, fp32, bf16, fp16.")
BATCH_SIZE_OPTION = typer.Option(
    None,
    help="Pairs per scorer batch (every requested scorer).",
    show_default="each scorer's own: rules 256, clip 64, mlm 8, aitqe 4, ocr 16",
)
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

    original_string = core.TyperOption._get_default_string

    def default_string(self, *, ctx, show_default_is_str, default_value):
        if show_default_is_str:  # "[default: rules]", not click's "[default: (rules)]"
            return str(self.show_default)
        return original_string(self, ctx=ctx, show_default_is_str=show_default_is_str, default_value=default_value)

    core.TyperOption._get_default_string = default_string
    core._mlmfilter_plain_labels = True
