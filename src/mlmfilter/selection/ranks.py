"""How alike two scores rank the same pairs: Spearman's rank correlation, in numpy.

Tied values share their average rank (as :func:`scipy.stats.rankdata` and
:func:`scipy.stats.spearmanr` do), so a column of few distinct values (an integer judge score)
is compared fairly. Two users: the evaluation's bootstrap runs it on many resamples at once
(``axis``), the report on a sample of two columns to find the ones that rank pairs alike; the
report needs no scipy for it.
"""

from __future__ import annotations

import numpy as np


def average_ranks(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """1-based ranks along ``axis``; tied values share the mean of the ranks they span."""
    a = np.moveaxis(np.asarray(values, dtype=np.float64), axis, -1)
    order = np.argsort(a, axis=-1, kind="stable")
    ordered = np.take_along_axis(a, order, axis=-1)
    starts = np.ones(ordered.shape, dtype=bool)  # the first position of each run of equal values
    starts[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    ends = np.ones(ordered.shape, dtype=bool)  # the last position of each run
    ends[..., :-1] = starts[..., 1:]
    n = a.shape[-1]
    position = np.broadcast_to(np.arange(n), ordered.shape)
    first = np.maximum.accumulate(np.where(starts, position, 0), axis=-1)
    last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, position, n - 1), axis=-1), axis=-1), axis=-1)
    ranks = np.empty(ordered.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=-1)
    return np.moveaxis(ranks, -1, axis)


def spearman(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray | float:
    """Spearman's rho of ``x`` and ``y`` along ``axis`` (no missing values): the Pearson
    correlation of their average ranks. NaN where a side is constant (it ranks nothing)."""
    rx, ry = average_ranks(x, axis), average_ranks(y, axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rx * ry).sum(axis=axis) / np.sqrt((rx * rx).sum(axis=axis) * (ry * ry).sum(axis=axis))
    return np.clip(rho, -1.0, 1.0)
