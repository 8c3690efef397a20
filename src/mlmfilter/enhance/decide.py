"""Acceptance, never blind replacement: re-score, compare with a margin, keep the best passing candidate.

:class:`Rescorer` scores the original caption and every candidate that passed the checks with the
same judge scorers (any registered scorer: ``mlm``, ``clip``, the AITQE scorer ...) on the same
decoded image, in one call per scorer, so before and after come from identical settings. Where a
judge scorer is the very one that scored the run (``Rescorer.recorded``), the original's scores are
the run's own row, not re-scored: enhance decides on the number the run recorded.

:class:`Decider` compares on the ``compare`` columns: the objective is their mean, and a candidate
is better when its objective beats the original's by at least ``margin`` (and, when
``max_metric_drop`` is set, no compared column falls by more than that). Among better candidates
the highest objective wins (ties: the first). The pair's reason is ``accepted``, or why the most
promising candidate failed: the first candidate's check reason (:mod:`mlmfilter.enhance.checks`)
when every candidate failed a check, ``not_better`` when one was scored but did not win,
``rescore_failed`` when the judge could not score (``low_score_mass`` when it answered but put less than
its floor of probability on a number: no score to decide on), else why there was no candidate at all.
The original is re-scored only when some candidate passed the checks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from mlmfilter.backends.generation import Generated
from mlmfilter.core import errors
from mlmfilter.core.sample import Sample
from mlmfilter.core.stats import BlockStats
from mlmfilter.enhance.checks import CaptionChecker, OriginalFacts
from mlmfilter.scorers.base import Scorer

ACCEPTED = "accepted"
REJECTED = "rejected"
# reasons beyond the check reasons
REASON_ACCEPTED = "accepted"
NOT_BETTER = "not_better"
NO_CANDIDATE = "no_candidate"  # the mode wrote nothing (AITQE: the caption was judged fine)
GENERATION_FAILED = "generation_failed"
RESCORE_FAILED = "rescore_failed"  # the judge could not score the original (or any passing candidate)
LOW_SCORE_MASS = errors.LOW_SCORE_MASS  # the judge's answer was mostly not a number: never decided on
# per-candidate outcome when it passed the checks
OUTCOME_ACCEPTED = "accepted"
OUTCOME_OUTSCORED = "outscored"  # better than the original, but another candidate was better still


class DecisionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: judge columns compared (their mean is the objective); None: the columns the selection reads
    compare: list[str] | None = None
    #: a candidate's objective must beat the original's by at least this much
    margin: float = Field(default=5.0, ge=0.0)
    #: None: not checked; else no compared column may fall by more than this
    max_metric_drop: float | None = Field(default=None, ge=0.0)


@dataclass
class Candidate:
    text: str
    reason: str | None = None  # a check reason, NOT_BETTER, OUTCOME_ACCEPTED / OUTCOME_OUTSCORED
    detail: str = ""
    scores: dict[str, float | None] | None = None
    gain: float | None = None


@dataclass
class Decision:
    decision: str
    reason: str
    detail: str
    caption: str | None  # the accepted rewrite
    before: dict[str, float | None]
    after: dict[str, float | None]  # of the accepted candidate, else of the best scored one (or empty)
    gain: float | None
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return self.decision == ACCEPTED


class Rescorer:
    """Scores captions of one image with the judge scorers; a failed score gives a reason, not a raise."""

    def __init__(self, scorers: Sequence[Scorer]):
        self.scorers = list(scorers)
        #: indices of the scorers that scored the source stage themselves: an original's columns of these
        #: are taken from the run's row (``recorded``), not re-scored
        self.recorded: set[int] = set()

    @property
    def columns(self) -> dict[str, Any]:
        return {name: dtype for scorer in self.scorers for name, dtype in scorer.columns.items()}

    @property
    def image_size(self) -> int | None:
        sizes = [s.image_size for s in self.scorers if s.image_size]
        return max(sizes) if sizes else None

    def setup(self) -> None:
        for scorer in self.scorers:
            scorer.ensure_setup()

    def score(
        self,
        pairs: Sequence[tuple[Sample, str]],
        stats: Mapping[str, BlockStats] | None = None,
        recorded: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[dict[str, Any] | str]:
        """Per (decoded sample, caption): the merged score columns, or the first error as ``reason: detail``.

        ``recorded``: per pair, the run's own row of that pair when the caption is its original (else None);
        the columns of the :attr:`recorded` scorers are taken from it instead of scoring again.
        """
        samples = [
            dataclasses.replace(sample, caption=caption, error=None, error_detail=None) for sample, caption in pairs
        ]
        known = list(recorded) if recorded is not None else [None] * len(samples)
        rows: list[dict[str, Any]] = [{} for _ in samples]
        for n, scorer in enumerate(self.scorers):
            todo = list(range(len(samples)))
            if n in self.recorded:
                todo = [i for i in todo if known[i] is None]
                for i in set(range(len(samples))) - set(todo):
                    rows[i].update({c: known[i].get(c) for c in scorer.columns})  # type: ignore[union-attr]
            if not todo:
                continue
            scored = scorer.score([samples[i] for i in todo], (stats or {}).get(scorer.name))
            for i, row in zip(todo, scored):
                rows[i].update(row)
        return [row if s.error is None else f"{s.error}: {s.error_detail}" for row, s in zip(rows, samples)]

    @property
    def all_recorded(self) -> bool:
        """Every judge scorer is the run's own: an original's scores cost nothing."""
        return bool(self.scorers) and len(self.recorded) == len(self.scorers)


class Decider:
    def __init__(self, options: DecisionOptions, compare: Sequence[str]):
        if not compare:
            raise ValueError("no score columns to compare: name them with compare")
        self.options = options
        self.compare = list(compare)

    def objective(self, scores: dict[str, Any]) -> float | None:
        values = [scores.get(c) for c in self.compare]
        if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
            return None
        return float(sum(values)) / len(values)

    def decide(
        self,
        before: dict[str, Any] | None,
        candidates: list[Candidate],
        failure: str | None = None,
        before_failure: str | None = None,
    ) -> Decision:
        """``candidates`` carry their check reason, and scores where they passed; ``failure``: why there are none;
        ``before_failure``: why the judge could not score the original (``reason: detail``)."""
        before_scores = {c: (before or {}).get(c) for c in self.compare}
        if failure is not None:
            return Decision(REJECTED, GENERATION_FAILED, failure, None, before_scores, {}, None, candidates)
        if not candidates:
            return Decision(
                REJECTED, NO_CANDIDATE, "the mode wrote no candidate", None, before_scores, {}, None, candidates
            )
        if all(c.reason is not None for c in candidates):  # every candidate failed a check
            first = candidates[0]
            return Decision(REJECTED, first.reason, first.detail, None, before_scores, {}, None, candidates)
        base = self.objective(before_scores) if before is not None else None
        scored = [c for c in candidates if c.reason is None and c.scores is not None]
        if base is None:
            for c in candidates:
                if c.reason is None:
                    c.reason = _rescore_reason(c.detail)
            detail = "the judge could not score the original" if before is None else "the original has no score"
            if before_failure:
                detail = f"{detail}: {before_failure}"
            reason = _rescore_reason(before_failure)
            return Decision(REJECTED, reason, detail, None, before_scores, {}, None, candidates)
        winners = []
        for c in scored:
            value = self.objective(c.scores)
            c.gain = None if value is None else value - base
            if value is None:
                c.reason, c.detail = NOT_BETTER, "not all compared scores present"
                continue
            drop = self._largest_drop(before_scores, c.scores)
            if c.gain < self.options.margin or c.gain <= 0:
                c.reason, c.detail = NOT_BETTER, f"gain {c.gain:+.2f} < margin {self.options.margin:g}"
            elif self.options.max_metric_drop is not None and drop[1] > self.options.max_metric_drop:
                c.reason, c.detail = NOT_BETTER, f"{drop[0]} falls by {drop[1]:.2f} > {self.options.max_metric_drop:g}"
            else:
                winners.append(c)
        for c in candidates:  # those not scored although they passed: the judge failed on them
            if c.reason is None and all(c is not w for w in winners):
                c.reason = _rescore_reason(c.detail)
        if winners:
            best = max(winners, key=lambda c: c.gain)  # max keeps the first of equal gains
            for c in winners:
                c.reason = OUTCOME_ACCEPTED if c is best else OUTCOME_OUTSCORED
            after = {k: best.scores.get(k) for k in self.compare}
            detail = f"gain {best.gain:+.2f} >= margin {self.options.margin:g}"
            return Decision(ACCEPTED, REASON_ACCEPTED, detail, best.text, before_scores, after, best.gain, candidates)
        gains = [c for c in scored if c.gain is not None]
        if gains:
            best = max(gains, key=lambda c: c.gain)
            after = {k: best.scores.get(k) for k in self.compare}
            return Decision(REJECTED, NOT_BETTER, best.detail, None, before_scores, after, best.gain, candidates)
        low = [c for c in candidates if c.reason == LOW_SCORE_MASS]
        return Decision(
            REJECTED,
            LOW_SCORE_MASS if low else RESCORE_FAILED,
            f"the judge could not score any candidate: {low[0].detail}"
            if low
            else "the judge could not score any candidate",
            None,
            before_scores,
            {},
            None,
            candidates,
        )

    def _largest_drop(self, before: dict[str, Any], after: dict[str, Any]) -> tuple[str, float]:
        drops = [(c, float(before[c]) - float(after[c])) for c in self.compare]
        return max(drops, key=lambda d: d[1])


def _rescore_reason(failure: str | None) -> str:
    """Why a caption has no score: ``low_score_mass`` when that is what the judge's failure says."""
    return LOW_SCORE_MASS if (failure or "").startswith(LOW_SCORE_MASS) else RESCORE_FAILED


def judge_pairs(
    checker: CaptionChecker,
    rescorer: Rescorer,
    decider: Decider,
    samples: Sequence[Sample],
    written: Sequence[list[Generated] | str],
    stats: Mapping[str, BlockStats] | None = None,
    recorded: Sequence[Mapping[str, Any] | None] | None = None,
) -> list[Decision]:
    """Check, re-score and decide for decoded samples and what the mode wrote (texts, or why it failed).

    Every original and every candidate that passed its checks go to the judge in one call.
    ``recorded``: per sample, the run's own row of the original (None: not recorded); the scores of the
    judge scorers that made it are read from there (:class:`Rescorer`).
    """
    known = list(recorded) if recorded is not None else [None] * len(samples)
    facts: list[OriginalFacts] = checker.facts([s.caption or "" for s in samples])
    per_pair: list[list[Candidate]] = []
    jobs: list[tuple[Sample, str]] = []
    owners: list[tuple[int, Candidate | None]] = []
    originals: list[Mapping[str, Any] | None] = []  # per job: the run's row when the job is an original
    for i, (sample, texts) in enumerate(zip(samples, written)):
        candidates = []
        if not isinstance(texts, str):
            seen: set[str] = set()
            for generated in texts:
                text = generated.text
                if text in seen:  # identical samples are one candidate
                    continue
                seen.add(text)
                result = checker.check(facts[i], text, generated.truncated)
                candidate = Candidate(text, result.reason, result.detail)
                candidates.append(candidate)
                if result.passed:
                    jobs.append((sample, text))
                    owners.append((i, candidate))
                    originals.append(None)
        needed = any(c.reason is None for c in candidates)  # the original is scored only when it is needed
        if needed or (known[i] is not None and rescorer.all_recorded):  # ... or when its scores are the run's
            jobs.append((sample, sample.caption or ""))
            owners.append((i, None))
            originals.append(known[i])
        per_pair.append(candidates)
    befores: dict[int, dict[str, Any] | None] = {}
    before_failures: dict[int, str] = {}
    for (i, candidate), result in zip(owners, rescorer.score(jobs, stats, originals) if jobs else []):
        scores = result if isinstance(result, dict) else None
        if candidate is None:
            befores[i] = scores
            if scores is None:
                before_failures[i] = result  # type: ignore[assignment]
        elif scores is not None:
            candidate.scores = scores
        else:
            candidate.detail = result  # type: ignore[assignment]
    return [
        decider.decide(
            befores.get(i),
            per_pair[i],
            written[i] if isinstance(written[i], str) else None,
            before_failures.get(i),
        )
        for i in range(len(samples))
    ]
