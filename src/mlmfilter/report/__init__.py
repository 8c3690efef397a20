"""See and trust the scores: an offline HTML report of a run, contact sheets and score stats.

- :mod:`.scan` / :mod:`.profile` / :mod:`.gather`: which pairs to show and the distributions,
  from streaming passes over the run's tables (bounded memory, any run size);
- :mod:`.thumbnails` + :mod:`mlmfilter.io.lookup`: captions and thumbnails read back from the shards;
- :mod:`.plots` / :mod:`.render`: matplotlib plots and Jinja2 templates -> one self-contained page.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlmfilter.report.gather import ReportData, ReportOptions, gather_report


def open_run(run_dir: str | os.PathLike):
    """The run's reader (:class:`mlmfilter.runs.read.RunReader`); a clear error for a non-run."""
    from mlmfilter.runs.read import RunReader

    return RunReader(run_dir)


class MissingExtra(ImportError):
    """An optional dependency the command needs is not installed; the message says what to install."""


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MissingExtra("the report draws its plots with matplotlib: pip install 'mlmfilter[report]'") from exc


#: the report's file in a run folder when no output is named
REPORT_FILE = "report.html"


def default_report_path(run_dir: str | os.PathLike) -> Path:
    """Where a report goes unless told: inside a local run folder (each run keeps its own), else
    ``<run name>-report.html`` in the current directory (a run on object storage)."""
    text = os.fspath(run_dir)
    if "://" in text:
        return Path(f"{text.rstrip('/').rsplit('/', 1)[-1] or 'run'}-{REPORT_FILE}")
    return Path(text) / REPORT_FILE


def write_report(
    run_dir: str | os.PathLike,
    output_html: str | os.PathLike,
    selection_dir: str | os.PathLike | None = None,
    options: ReportOptions | None = None,
) -> Path | str:
    """Write the run's report to ``output_html`` (one self-contained file; a local path or an fsspec
    URL) and return where it is: a Path, or that URL.

    ``selection_dir`` defaults to ``RUN/selection`` when that holds a selection."""
    from mlmfilter.io.writers import atomic_write
    from mlmfilter.report.render import render_report

    options = options or ReportOptions()
    require_matplotlib()
    run = open_run(run_dir)
    data = gather_report(run, run.url, None if selection_dir is None else os.fspath(selection_dir), options)
    return atomic_write(output_html, render_report(data, options))  # a local path, or an fsspec URL as given


__all__ = [
    "REPORT_FILE",
    "MissingExtra",
    "default_report_path",
    "ReportData",
    "ReportOptions",
    "gather_report",
    "open_run",
    "write_report",
]
