"""Evaluation metrics against scipy / scikit-learn on known inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from mlmfilter.evaluation.metrics import CORRELATIONS, auc, correlations, kendall_b_and_c, paired_comparison


@pytest.fixture(scope="module")
def tied_ratings():
    """Scores against 1-4 ratings with many ties on both sides, like the Expert set."""
    rng = np.random.default_rng(3)
    human = rng.integers(1, 5, 200).astype(float)
    scores = np.round(human + rng.normal(0, 1.2, 200), 1)
    return scores, human


def test_point_values_equal_scipy(tied_ratings):
    scores, human = tied_ratings
    result = correlations(scores, human, n_resamples=0)
    assert result["kendall_tau_b"].value == pytest.approx(
        stats.kendalltau(scores, human, variant="b").statistic, abs=1e-12
    )
    assert result["kendall_tau_c"].value == pytest.approx(
        stats.kendalltau(scores, human, variant="c").statistic, abs=1e-12
    )
    assert result["spearman"].value == pytest.approx(stats.spearmanr(scores, human).statistic, abs=1e-12)
    assert result["pearson"].value == pytest.approx(stats.pearsonr(scores, human).statistic, abs=1e-12)
    assert result["kendall_tau_b"].low is None  # no resamples, no interval


def test_tau_c_from_tau_b_matches_scipy_on_small_known_inputs():
    for x, y in [([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]), ([1, 1, 2, 2, 3, 3], [1, 2, 1, 2, 4, 4]), ([3, 1, 2], [1, 2, 3])]:
        b, c = kendall_b_and_c(np.array(x, float), np.array(y, float))
        assert b == pytest.approx(stats.kendalltau(x, y, variant="b").statistic, abs=1e-12)
        assert c == pytest.approx(stats.kendalltau(x, y, variant="c").statistic, abs=1e-12)
    # perfectly concordant, no ties: every tau is 1
    assert kendall_b_and_c(np.arange(6.0), np.arange(6.0) * 2) == pytest.approx([1.0, 1.0])


def test_bootstrap_intervals_match_scipy_and_are_seeded(tied_ratings):
    scores, human = tied_ratings
    result = correlations(scores, human, n_resamples=200, seed=5)
    again = correlations(scores, human, n_resamples=200, seed=5)
    assert result == again
    for name in CORRELATIONS:
        e = result[name]
        assert e.low < e.value < e.high and e.high - e.low < 0.5
    # the same resamples through scipy.stats.bootstrap directly give the same Pearson interval
    reference = stats.bootstrap(
        (scores, human),
        lambda x, y: stats.pearsonr(x, y).statistic,
        paired=True,
        vectorized=False,
        n_resamples=200,
        method="percentile",
        rng=np.random.default_rng(5),
    ).confidence_interval
    assert result["pearson"].low == pytest.approx(reference.low, abs=1e-9)
    assert result["pearson"].high == pytest.approx(reference.high, abs=1e-9)
    assert correlations(scores, human, n_resamples=200, seed=6)["pearson"] != result["pearson"]


def test_a_constant_column_has_no_correlation_rather_than_zero():
    result = correlations([0.5] * 10, list(range(10)), n_resamples=50)
    assert all(result[name].value is None and result[name].low is None for name in CORRELATIONS)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="one length"):
        correlations([1, 2, 3], [1, 2])


def test_paired_comparison_counts_and_auc():
    result = paired_comparison([3, 4, 2, 5], [1, 4, 3, 0])
    assert (result.n, result.wins, result.ties, result.losses) == (4, 2, 1, 1)
    assert result.win_rate == 0.5 and result.tie_rate == 0.25
    # the unpaired AUC over all 16 true x corrupted pairs, as scikit-learn computes it
    expected = roc_auc_score([1] * 4 + [0] * 4, [3, 4, 2, 5, 1, 4, 3, 0])
    assert result.auc == pytest.approx(expected)
    assert auc([3, 4], [1, 3]) == pytest.approx(3.5 / 4)  # 3>1, 3=3 (half), 4>1, 4>3
    assert paired_comparison([], []).to_json()["win_rate"] is None
