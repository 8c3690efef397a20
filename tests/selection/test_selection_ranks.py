"""Spearman's rho in numpy (the report's and the evaluation's one implementation) against scipy's."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from mlmfilter.selection.ranks import average_ranks, spearman


def test_average_ranks_share_ties_as_scipy_does():
    values = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0])
    np.testing.assert_array_equal(average_ranks(values), [5.0, 1.5, 5.0, 3.0, 5.0, 1.5])
    rng = np.random.default_rng(0)
    grid = rng.integers(0, 5, size=(7, 40)).astype(float)  # few distinct values: many ties
    np.testing.assert_array_equal(average_ranks(grid, axis=-1), stats.rankdata(grid, axis=-1))
    np.testing.assert_array_equal(average_ranks(grid.T, axis=0), stats.rankdata(grid.T, axis=0))


@pytest.mark.parametrize("distinct", [3, 20, None])  # integer judge scores with ties, or continuous
def test_spearman_matches_scipy_one_sample_and_many_resamples_at_once(distinct):
    rng = np.random.default_rng(distinct or 1)
    n = 300
    x = rng.integers(0, distinct, n).astype(float) if distinct else rng.normal(size=n)
    y = x + rng.normal(scale=2.0, size=n)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    resamples = rng.integers(0, n, size=(50, n))  # what a vectorised bootstrap hands over
    expected = [stats.spearmanr(x[r], y[r]).statistic for r in resamples]
    np.testing.assert_allclose(spearman(x[resamples], y[resamples], axis=-1), expected, rtol=0, atol=1e-12)


def test_a_constant_side_ranks_nothing():
    assert np.isnan(spearman(np.ones(10), np.arange(10.0)))
    assert spearman(np.arange(10.0), -np.arange(10.0)) == -1.0
