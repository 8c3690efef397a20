"""The `mlmfilter` command: the typer app and every command, registered here in --help's order.

Each command module turns flags into an Options model, makes one call of :mod:`mlmfilter.api` and
prints the result; what they share is in :mod:`mlmfilter.cli.common`. A command module's import
stays cheap: heavy imports go inside the command functions.
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from mlmfilter.cli import convert, demo, embed, enhance, evaluate, plan, report, reshard, score, select, teach, train
from mlmfilter.cli.common import interruptible, plain_type_labels


class InterruptibleGroup(TyperGroup):
    """Ctrl-C in any command exits 130 with one line, never click's "Aborted!" and exit 1 (commands that
    know what they finished say so first: :func:`~mlmfilter.cli.common.interruptible`)."""

    def invoke(self, ctx):
        with interruptible("re-run the same command"):
            return super().invoke(ctx)


plain_type_labels()  # metavars in --help, not Python type tags
app = typer.Typer(
    cls=InterruptibleGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


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


app.command()(score.score)
app.command()(select.select)
app.command()(reshard.reshard)
app.command()(demo.demo)
app.command("plan")(plan.plan)
app.command("verify")(plan.verify)
app.command("scorers")(score.list_scorers)
app.command("report")(report.report)
app.command("inspect")(report.inspect)
app.command("stats")(report.stats)
convert.register(app)  # convert (and its hidden old name convert-llava), export, import, judges
app.command("train")(train.train)
app.command("enhance")(enhance.enhance)
app.command("embed")(embed.embed)
app.command("dedup")(embed.dedup)
app.command("distill")(embed.distill)
app.add_typer(teach.teach_app, name="teach")
app.add_typer(evaluate.eval_app, name="eval")

if __name__ == "__main__":
    app()
