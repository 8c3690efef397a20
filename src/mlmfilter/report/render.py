"""Gathered data -> one self-contained HTML page (Jinja2 templates shipped as package data).

Everything the page shows is inline (SVG plots, PNG/JPEG data URIs, CSS), so the file opens
offline and can be mailed or attached to a ticket. Autoescaping is on: captions are untrusted
web text.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from mlmfilter.report import plots
from mlmfilter.report.gather import ReportData, ReportOptions
from mlmfilter.report.profile import DEFAULT_QUANTILES
from mlmfilter.report.scan import PairRef
from mlmfilter.report.thumbnails import ShownSample


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("mlmfilter.report", "templates"),
        autoescape=select_autoescape(["html", "j2"], default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = format_number
    env.filters["pct"] = lambda value: "" if value is None else f"{value:.1%}"
    return env


def format_number(value: Any) -> str:
    """Scores as people read them: 3 significant digits, integers as integers."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)) and float(value).is_integer() and abs(value) < 1e9:
        return str(int(value))
    if isinstance(value, (int, float)):
        return f"{value:.4g}"
    return str(value)


@dataclass
class _ColumnView:
    section: Any
    histogram: str
    curve: str
    quantiles: list[tuple[float, float | None]]


@dataclass
class _PairView:
    pair: Any
    scatter: str


def render_report(data: ReportData, options: ReportOptions | None = None) -> str:
    options = options or ReportOptions()
    columns = []
    for section in data.columns:
        profile = section.profile
        if profile.empty:
            columns.append(_ColumnView(section, "", "", []))
            continue
        columns.append(
            _ColumnView(
                section,
                plots.histogram_svg(profile, section.threshold),
                plots.kept_curve_svg(profile, section.threshold),
                list(profile.quantiles(DEFAULT_QUANTILES).items()),
            )
        )
    pairs = []
    for pair in data.pairs:
        highlighted = [_points(pair.a, pair.b, pair.a_over_b), _points(pair.a, pair.b, pair.b_over_a)]
        pairs.append(_PairView(pair, plots.scatter_png(pair.a, pair.b, pair.x, pair.y, *highlighted)))
    errors_plot = plots.bar_svg({r: c for r, c, _ in data.errors}, "error rows by reason") if data.errors else ""
    shown_columns = data.card_columns
    # a failed flag is explained by its scorer's measurements (rules_ok: rules_words, rules_min_side...)
    flag_columns = {
        flag.name: [
            *shown_columns,
            *(c.profile.name for c in data.columns if c.profile.name.startswith(flag.name.split("_")[0] + "_")),
        ]
        for flag in data.flags
    }
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            data=data,
            columns=columns,
            pairs=pairs,
            errors_plot=errors_plot,
            shown_columns=shown_columns,
            flag_columns=flag_columns,
            options=options,
        )
    )


def _points(a: str, b: str, refs: list[PairRef]) -> list[tuple[float, float]]:
    """(a, b) of the pairs that have both values, to draw on top of a scatter plot."""
    return [(r.values[a], r.values[b]) for r in refs if r.values.get(a) is not None and r.values.get(b) is not None]


@dataclass
class ContactSheet:
    """The pairs `mlmfilter inspect` found, as the gallery macro reads them."""

    rows: list[PairRef]
    shown: dict[tuple[str, str], ShownSample] = field(default_factory=dict)

    def sample(self, ref: PairRef) -> ShownSample | None:
        return self.shown.get(ref.where)


def render_contact_sheet(
    sheet: ContactSheet, *, run: str, title: str, matched: int, columns: Sequence[str], warnings: Sequence[str] = ()
) -> str:
    return (
        _environment()
        .get_template("contact_sheet.html.j2")
        .render(
            data=sheet,
            run=run,
            title=title,
            matched=matched,
            columns=list(columns),
            warnings=list(warnings),
            generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        )
    )
