"""Every command's --help reads as documentation: metavars and defaults, no Python type tags or markup."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from mlmfilter.cli.app import app

#: what typer and click print when a parameter has no metavar, and markup that did not render
LEAKS = re.compile(
    r"<(str|int|float|bool|path|file|directory|list\[[^>]*\]|tuple[^>]*)>"  # typer's Python type tags
    r"|--[\w-]+\s+(TEXT|INTEGER|FLOAT|BOOLEAN)\b"  # click's type names as metavars
    r"|\[default: None\]|\[bold|\[/\]|\[red|\[yellow|\[dim"  # empty defaults, unrendered rich markup
    r"|:(mod|func|class|meth|attr):|``"  # docstring (reST) markup
)


def _command_paths(command, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    subcommands = getattr(command, "commands", None) or {}  # typer's groups are not click.Group subclasses
    for name, sub in sorted(subcommands.items()):
        paths.extend(_command_paths(sub, (*prefix, name)))
    return paths


COMMANDS = _command_paths(typer.main.get_command(app))


def test_the_walk_finds_every_command_group():
    names = {" ".join(p) for p in COMMANDS}
    assert {"score", "select", "reshard", "scorers", "teach sample"} <= names
    assert len(COMMANDS) > 15


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "mlmfilter")
def test_help_has_no_type_tags_or_markup(path):
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "120", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    leaks = sorted({m.group(0) for m in LEAKS.finditer(result.output)})
    assert not leaks, f"`mlmfilter {' '.join(path)} --help` shows {leaks}:\n{result.output}"


def test_score_help_shows_metavars_defaults_and_the_input_columns():
    out = CliRunner().invoke(app, ["score", "--help"], env={"COLUMNS": "160", "NO_COLOR": "1"}).output
    assert re.search(r"--workers\s+N\b", out) and re.search(r"--model\s+MODEL\b", out)
    for flag in ("--image-column", "--caption-column", "--uid-column", "--url-column", "--captions-file"):
        assert re.search(rf"{flag}\s+(NAME|FILE)\b", out), flag
    teach = CliRunner().invoke(app, ["teach", "sample", "--help"], env={"COLUMNS": "160", "NO_COLOR": "1"}).output
    assert "--rules" in teach and "default: no-rules" not in teach  # an off switch needs no default line
    reshard = CliRunner().invoke(app, ["reshard", "--help"], env={"COLUMNS": "160", "NO_COLOR": "1"}).output
    assert re.search(r"--samples-per-shard\s+N\s.*\[default: 10000\]", reshard)
