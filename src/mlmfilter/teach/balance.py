"""Balance teacher labels: bin the scores and sample evenly across bins, per metric.

MLM-Filter "uniformly sample[d] 4k instructions from initial 40k instructions based on the integer
scores to avoid scoring bias"; the binning is not published, so it is an option (default 10 equal bins
over 0..100; the last bin includes 100). Only parsed labels take part; error rows are counted in the
report. Per metric, each bin gets an equal share of the target, bins with fewer labels give all they
have and the others share the rest (:func:`even_allocation`); inside a bin labels are drawn with the seed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mlmfilter.teach.even import even_allocation


class BalanceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: int = Field(1000, ge=1)  # per metric
    bins: int = Field(10, ge=1, le=101)
    low: float = 0.0
    high: float = 100.0
    seed: int = 0


def bin_of(scores: np.ndarray, options: BalanceOptions) -> np.ndarray:
    width = (options.high - options.low) / options.bins
    return np.clip(np.floor((scores - options.low) / width), 0, options.bins - 1).astype(np.int64)


def bin_edges(options: BalanceOptions) -> list[float]:
    return [float(x) for x in np.linspace(options.low, options.high, options.bins + 1)]


def histogram(bins: np.ndarray, n_bins: int) -> list[int]:
    return [int(c) for c in np.bincount(bins, minlength=n_bins)[:n_bins]]


def balance(rows: list[dict[str, Any]], options: BalanceOptions) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The kept label rows (each with its ``bin``), in input order, and the report with histograms."""
    report: dict[str, Any] = {"options": options.model_dump(), "edges": bin_edges(options), "metrics": {}}
    rng = np.random.default_rng(options.seed)
    keep: set[int] = set()
    bins_by_row: dict[int, int] = {}
    metrics = sorted({r["metric"] for r in rows})
    for metric in metrics:
        index = np.array(
            [
                i
                for i, r in enumerate(rows)
                if r["metric"] == metric and r.get("error") is None and r.get("score") is not None
            ],
            dtype=np.int64,
        )
        errored = sum(1 for r in rows if r["metric"] == metric) - len(index)
        bins = (
            bin_of(np.array([rows[i]["score"] for i in index], dtype=np.float64), options)
            if len(index)
            else np.zeros(0, np.int64)
        )
        members = [index[bins == b] for b in range(options.bins)]
        quotas = even_allocation([len(m) for m in members], options.target)
        kept_bins = []
        for b, (member, quota) in enumerate(zip(members, quotas)):
            chosen = rng.choice(member, size=quota, replace=False) if quota else []
            for i in chosen:
                keep.add(int(i))
                bins_by_row[int(i)] = b
            kept_bins.extend([b] * quota)
        report["metrics"][metric] = {
            "labelled": int(len(index)),
            "errors": int(errored),
            "kept": int(sum(quotas)),
            "before": histogram(bins, options.bins),
            "after": histogram(np.array(kept_bins, np.int64), options.bins),
            "short_bins": [
                b for b, (m, q) in enumerate(zip(members, quotas)) if len(m) == q and q < options.target // options.bins
            ],
        }
    kept = [{**rows[i], "bin": bins_by_row[i]} for i in sorted(keep)]
    return kept, report
