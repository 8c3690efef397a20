"""Agreement statistics: rank correlations with bootstrap intervals, paired win rates and AUC (scipy).

Correlations follow the caption-evaluation literature: Kendall tau-b and tau-c (CLIPScore reports
tau-c on Flickr8K-Expert and tau-b on CrowdFlower), Spearman's rho and Pearson's r, each with a
percentile bootstrap interval from :func:`scipy.stats.bootstrap` over resampled (score, human)
pairs, seeded so a rerun prints the same interval. Percentile rather than BCa: BCa needs a
jackknife (one statistic per left-out row), which is too slow for 17k judgements.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from mlmfilter.selection.ranks import spearman

CORRELATIONS = ("kendall_tau_b", "kendall_tau_c", "spearman", "pearson")


@dataclass(frozen=True)
class Estimate:
    """A statistic with its bootstrap confidence interval (None where undefined, e.g. a constant column)."""

    value: float | None
    low: float | None
    high: float | None

    def to_json(self) -> dict:
        return asdict(self)


def kendall_b_and_c(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall tau-b and tau-c from one :func:`scipy.stats.kendalltau` call (half the bootstrap cost).

    Both are (concordant - discordant) pairs over a different normaliser: tau-b's is
    ``sqrt((n0 - ties_x) (n0 - ties_y))``, tau-c's ``n^2 (m - 1) / (2 m)`` with ``m`` the fewer
    distinct values of the two sides, as scipy defines them.
    """
    from scipy import stats

    tau_b = stats.kendalltau(x, y, variant="b").statistic
    n = len(x)
    pairs = n * (n - 1) / 2
    _, x_counts = np.unique(x, return_counts=True)
    _, y_counts = np.unique(y, return_counts=True)
    x_ties, y_ties = (x_counts * (x_counts - 1) / 2).sum(), (y_counts * (y_counts - 1) / 2).sum()
    concordant_minus_discordant = tau_b * np.sqrt((pairs - x_ties) * (pairs - y_ties))
    m = min(len(x_counts), len(y_counts))
    tau_c = 2 * concordant_minus_discordant / (n * n * (m - 1) / m) if m > 1 else np.nan
    return np.array([tau_b, tau_c])


def _pearson(x, y, axis=-1):
    from scipy import stats

    return stats.pearsonr(x, y, axis=axis).statistic


#: bootstrap groups: (names, statistic, vectorized). Spearman and Pearson take an ``axis`` and run
#: on many resamples at once; scipy's Kendall tau has none and runs once per resample
_GROUPS = (
    (("kendall_tau_b", "kendall_tau_c"), kendall_b_and_c, False),
    (("spearman",), spearman, True),
    (("pearson",), _pearson, True),
)


def correlations(
    scores: Sequence[float],
    human: Sequence[float],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    which: Sequence[str] = CORRELATIONS,
) -> dict[str, Estimate]:
    """Each correlation of ``scores`` with ``human`` (same length, no missing values)."""
    from scipy import stats

    x, y = np.asarray(scores, dtype=np.float64), np.asarray(human, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(
            f"scores and human ratings must be two 1-D sequences of one length, got {x.shape} and {y.shape}"
        )
    unknown = sorted(set(which) - set(CORRELATIONS))
    if unknown:
        raise ValueError(f"unknown correlations {', '.join(unknown)}; known: {', '.join(CORRELATIONS)}")
    out: dict[str, Estimate] = {}
    # a constant side has no ranking: every correlation is undefined, not zero
    degenerate = len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0
    for names, statistic, vectorized in _GROUPS:
        if not set(names) & set(which):
            continue
        if degenerate:
            out.update({name: Estimate(None, None, None) for name in names})
            continue
        values = np.atleast_1d(statistic(x, y))
        lows = highs = [None] * len(names)
        if n_resamples > 0:
            with warnings.catch_warnings():
                # resamples that draw one value only give NaN: the interval is then NaN, reported as None
                warnings.simplefilter("ignore")
                result = stats.bootstrap(
                    (x, y),
                    statistic,
                    paired=True,
                    vectorized=vectorized,
                    n_resamples=n_resamples,
                    batch=max(1, 2_000_000 // len(x)),  # bounded memory: about 2M resampled values at a time
                    confidence_level=confidence,
                    method="percentile",
                    rng=np.random.default_rng(seed),
                )
            lows = np.atleast_1d(result.confidence_interval.low)
            highs = np.atleast_1d(result.confidence_interval.high)
        for name, value, low, high in zip(names, values, lows, highs):
            out[name] = Estimate(_finite(value), _finite(low), _finite(high))
    return {name: out[name] for name in which}


@dataclass(frozen=True)
class PairedComparison:
    """How often the true caption's score beats its corrupted variant's (higher = better assumed)."""

    n: int
    wins: int
    ties: int
    losses: int
    auc: float | None  # P(true > corrupted) + P(tie) / 2 over all true x corrupted pairs (Mann-Whitney)

    @property
    def win_rate(self) -> float | None:
        return self.wins / self.n if self.n else None

    @property
    def tie_rate(self) -> float | None:
        return self.ties / self.n if self.n else None

    def to_json(self) -> dict:
        return {**asdict(self), "win_rate": self.win_rate, "tie_rate": self.tie_rate}


def paired_comparison(true_scores: Sequence[float], corrupted_scores: Sequence[float]) -> PairedComparison:
    """Paired wins/ties/losses of each true score against its own corruption, and the unpaired AUC."""
    t, c = np.asarray(true_scores, dtype=np.float64), np.asarray(corrupted_scores, dtype=np.float64)
    if t.shape != c.shape:
        raise ValueError(f"true and corrupted scores differ in length: {t.shape} vs {c.shape}")
    return PairedComparison(
        n=int(t.size),
        wins=int(np.sum(t > c)),
        ties=int(np.sum(t == c)),
        losses=int(np.sum(t < c)),
        auc=auc(t, c),
    )


def auc(positive: Sequence[float], negative: Sequence[float]) -> float | None:
    """ROC AUC of telling positives from negatives by score: the Mann-Whitney U over n_pos * n_neg."""
    from scipy import stats

    p, n = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if not p.size or not n.size:
        return None
    u = stats.mannwhitneyu(p, n, alternative="two-sided").statistic  # U of the first sample, ties count half
    return float(u) / (p.size * n.size)


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if np.isfinite(value) else None
