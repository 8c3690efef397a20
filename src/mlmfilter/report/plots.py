"""Plots for the report, drawn with matplotlib's Agg/SVG backends into strings the page inlines.

No pyplot: each plot is its own ``Figure`` (no global state, safe in threads and servers).
Line plots are inline SVG with text kept as text (small, sharp); scatter plots with thousands
of points are PNG data URIs, which stay small where SVG would hold one element per point.
"""

from __future__ import annotations

import io

import numpy as np
from markupsafe import Markup

from mlmfilter.clients.chat import image_data_url
from mlmfilter.report.profile import ColumnProfile

WIDTH, HEIGHT = 4.2, 2.6  # inches
BAR_CHART_MARGIN = 1.3  # inches of a bar chart's height that are not bars
BAR = "#4c78a8"
CUT = "#d62728"
DISAGREE_A, DISAGREE_B = "#e45756", "#f58518"


def _figure(width: float = WIDTH, height: float = HEIGHT):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _svg(fig) -> Markup:
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "mlmfilter"}):
        fig.savefig(buffer, format="svg")
    text = buffer.getvalue()
    return Markup(text[text.index("<svg") :])  # drop the XML prolog and doctype: the page is HTML


def _png_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return image_data_url(buffer.getvalue(), "png")


def histogram_svg(profile: ColumnProfile, cut: float | None = None, bins: int = 32) -> Markup:
    fig, ax = _figure()
    edges, counts = profile.coarse(bins)
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=BAR, edgecolor="white", linewidth=0.4)
    if cut is not None:
        ax.axvline(cut, color=CUT, linewidth=1.5, linestyle="--")
    ax.set_xlabel(profile.name)
    ax.set_ylabel("pairs")
    ax.set_title(f"{profile.name}: {profile.count} values, {profile.missing} missing", fontsize=9)
    return _svg(fig)


def kept_curve_svg(profile: ColumnProfile, cut: float | None = None) -> Markup:
    fig, ax = _figure()
    thresholds, fraction = profile.kept_curve()
    ax.plot(thresholds, fraction, color=BAR, linewidth=1.6)
    if cut is not None:
        ax.axvline(cut, color=CUT, linewidth=1.5, linestyle="--")
        ax.annotate(
            f"{profile.kept_fraction(cut):.1%} kept",
            (cut, profile.kept_fraction(cut)),
            textcoords="offset points",
            xytext=(6, 6),
            color=CUT,
            fontsize=8,
        )
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"threshold on {profile.name} (keep >=)")
    ax.set_ylabel("fraction kept")
    ax.grid(alpha=0.3)
    return _svg(fig)


def scatter_png(
    a: str,
    b: str,
    x: np.ndarray,
    y: np.ndarray,
    a_over_b: list[tuple[float, float]],
    b_over_a: list[tuple[float, float]],
) -> str:
    """A scatter of sampled rows; the most disagreeing pairs drawn on top in two colours."""
    fig, ax = _figure(4.6, 3.4)
    both = ~np.isnan(x) & ~np.isnan(y)
    ax.scatter(x[both], y[both], s=6, alpha=0.35, color=BAR, linewidths=0, label="sampled pairs")
    for points, color, label in (
        (a_over_b, DISAGREE_A, f"{a} high, {b} low"),
        (b_over_a, DISAGREE_B, f"{b} high, {a} low"),
    ):
        if points:
            px, py = zip(*points)
            ax.scatter(px, py, s=28, color=color, edgecolors="black", linewidths=0.5, label=label)
    ax.set_xlabel(a)
    ax.set_ylabel(b)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return _png_uri(fig)


def bar_svg(counts: dict[str, int], title: str) -> Markup:
    """Horizontal bars for a few labelled counts (error reasons, decisions)."""
    # room for the title, the tick labels and the axis label whatever the number of bars (one bar in
    # 0.7 inch had its labels cut off)
    fig, ax = _figure(WIDTH, BAR_CHART_MARGIN + 0.28 * max(len(counts), 1))
    labels = list(counts)
    ax.barh(labels[::-1], [counts[k] for k in labels][::-1], color=BAR)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("pairs")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # counts of pairs: no 0.2 of a pair
    return _svg(fig)
