"""Score distributions as text, for `mlmfilter stats`: quantiles and a histogram of bars."""

from __future__ import annotations

from rich import box
from rich.table import Table

from mlmfilter.report.profile import DEFAULT_QUANTILES, ColumnProfile
from mlmfilter.report.render import format_number

BAR_WIDTH = 40
EIGHTHS = " ▏▎▍▌▋▊▉█"


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar of ``fraction`` (0..1) of ``width`` cells, in eighth-cell steps."""
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, rest = divmod(eighths, 8)
    return "█" * full + (EIGHTHS[rest] if rest else "")


def headline(profile: ColumnProfile) -> str:
    return (
        f"{profile.name}: {profile.count} values, {profile.missing} missing, "
        f"min {format_number(profile.low)}, mean {format_number(profile.mean)}, max {format_number(profile.high)}"
    )


def quantile_table(profile: ColumnProfile) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("quantile", justify="right")
    table.add_column("value", justify="right")
    table.add_column("kept at >=", justify="right")
    table.add_column("pairs", justify="right")
    for q, value in profile.quantiles(DEFAULT_QUANTILES).items():
        kept = profile.kept_count(value)  # counted: every row at the value is kept, ties included
        table.add_row(
            f"{q * 100:g}%",
            format_number(value),
            f"{profile.kept_fraction(value):.1%}",
            "" if kept is None else str(kept),
        )
    return table


def histogram_table(profile: ColumnProfile, bins: int = 16) -> Table:
    edges, counts = profile.coarse(bins)
    peak = max(int(counts.max()), 1)
    table = Table(show_header=True, box=None, pad_edge=False)
    table.add_column(f"{profile.name} from", justify="right")
    table.add_column("to", justify="right")
    table.add_column("pairs", justify="right")
    table.add_column("", no_wrap=True)
    for low, high, count in zip(edges[:-1], edges[1:], counts):
        table.add_row(format_number(float(low)), format_number(float(high)), str(int(count)), bar(count / peak))
    return table
