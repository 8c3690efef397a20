"""Help pages a user can read: a metavar (``MODEL``, ``N``, ``PATH``) or nothing beside each flag.

typer (0.2x) prints the Python type of every parameter (``<list[str]>``, ``<bool>``, ``<str>``) in
its help pages; those tags mean nothing to a curator. :func:`plain_type_labels` makes typer show
the parameter's own metavar, a name-based one, the choices, or nothing for flags and arguments
(whose name is already shown), and hides the "default: no-flag" line of off-by-default switches.
"""

from __future__ import annotations

from typing import Any

import typer

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
