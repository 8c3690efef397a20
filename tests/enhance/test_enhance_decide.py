"""Re-scoring and decisions with a scripted judge: accept, not better, best of several, failures."""

from __future__ import annotations

import pytest
from PIL import Image

from mlmfilter.backends.generation import Generated
from mlmfilter.core.sample import Sample
from mlmfilter.enhance import checks, decide
from mlmfilter.enhance.checks import CaptionChecker
from mlmfilter.enhance.decide import Decider, DecisionOptions, Rescorer, judge_pairs
from tests.support.enhance import FAIL, ScriptedJudge

ORIGINAL = "a dog in a park"


def _sample(caption: str = ORIGINAL, key: str = "0") -> Sample:
    return Sample(
        uid=f"{int(key):032x}", shard="s0", key=key, caption=caption, image=Image.new("RGB", (40, 32), "green")
    )


def _run(scores, written, **decision):
    judge = ScriptedJudge(scores)
    compare = decision.pop("compare", ["itm"])
    decider = Decider(DecisionOptions(**decision), compare)
    samples = [_sample(key=str(i)) for i in range(len(written))]
    out = judge_pairs(CaptionChecker(), Rescorer([judge]), decider, samples, written)
    return out, judge


def _g(*texts: str) -> list[Generated]:
    return [Generated(t, "stop", 8) for t in texts]


def test_a_better_rewrite_is_accepted():
    rewrite = "a brown dog runs across the grass in a park"
    (d,), judge = _run({ORIGINAL: 30, rewrite: 60}, [_g(rewrite)])
    assert d.accepted and d.decision == "accepted" and d.reason == "accepted"
    assert d.caption == rewrite
    assert d.before == {"itm": 30.0} and d.after == {"itm": 60.0} and d.gain == pytest.approx(30.0)
    assert sorted(judge.seen) == sorted([ORIGINAL, rewrite])  # original and candidate re-scored


def test_below_the_margin_is_not_better():
    rewrite = "a brown dog runs across the grass in a park"
    (d,), _ = _run({ORIGINAL: 30, rewrite: 34}, [_g(rewrite)], margin=5)
    assert not d.accepted and d.reason == decide.NOT_BETTER and d.caption is None
    assert d.after == {"itm": 34.0} and d.gain == pytest.approx(4.0)
    (d,), _ = _run({ORIGINAL: 30, rewrite: 34}, [_g(rewrite)], margin=4)
    assert d.accepted


def test_a_worse_rewrite_is_rejected_even_with_zero_margin():
    rewrite = "a brown dog runs across the grass in a park"
    (d,), _ = _run({ORIGINAL: 30, rewrite: 30}, [_g(rewrite)], margin=0)
    assert d.reason == decide.NOT_BETTER


def test_best_of_several_candidates_is_kept():
    good, best, copy = (
        "a brown dog on the grass of a park",
        "a brown dog runs across the grass of a park",
        "A dog in a park.",
    )
    (d,), judge = _run({ORIGINAL: 20, good: 40, best: 70}, [_g(copy, good, best, good)])
    assert d.caption == best and d.gain == pytest.approx(50.0)
    assert [c.text for c in d.candidates] == [copy, good, best]  # duplicates are one candidate
    assert [c.reason for c in d.candidates] == [checks.COPY, decide.OUTCOME_OUTSCORED, decide.OUTCOME_ACCEPTED]
    assert [c.gain for c in d.candidates] == [None, pytest.approx(20.0), pytest.approx(50.0)]
    assert copy not in judge.seen  # a candidate failing a check never reaches the judge


def test_objective_is_the_mean_of_compared_columns_and_drops_can_be_bounded():
    rewrite = "a brown dog runs across the grass in a park"
    scores = {ORIGINAL: {"itm": 20, "odf": 60}, rewrite: {"itm": 60, "odf": 50}}
    (d,), _ = _run(scores, [_g(rewrite)], compare=["itm", "odf"])
    assert d.accepted and d.gain == pytest.approx(15.0)
    assert d.before == {"itm": 20.0, "odf": 60.0} and d.after == {"itm": 60.0, "odf": 50.0}
    (d,), _ = _run(scores, [_g(rewrite)], compare=["itm", "odf"], max_metric_drop=5)
    assert d.reason == decide.NOT_BETTER and "odf falls by 10" in d.detail


def test_failures_and_empty_writes():
    rewrite = "a brown dog runs across the grass in a park"
    other = "a black dog sits on a bench in a park"
    decisions, judge = _run(
        {ORIGINAL: 30, rewrite: FAIL, other: 70},
        [_g(rewrite), _g(rewrite, other), "scorer_error: CUDA fell over", [], _g(("a dog in a park, seen from"))],
    )
    only_failed, one_failed, generation_failed, nothing, _ = decisions
    assert only_failed.reason == decide.RESCORE_FAILED and only_failed.candidates[0].reason == decide.RESCORE_FAILED
    assert one_failed.accepted and one_failed.caption == other
    assert generation_failed.reason == decide.GENERATION_FAILED and "CUDA" in generation_failed.detail
    assert nothing.reason == decide.NO_CANDIDATE


def test_every_candidate_failing_its_checks_gives_the_first_reason_and_no_judge_call():
    (d,), judge = _run(
        {},
        [[Generated("I'm sorry, I cannot see the image.", "stop", 9), Generated("a dog in a park and", "length", 96)]],
    )
    assert d.reason == checks.REFUSAL and [c.reason for c in d.candidates] == [checks.REFUSAL, checks.TRUNCATED]
    assert judge.seen == []  # not even the original: nothing to compare it with


def test_an_original_the_judge_cannot_score_rejects():
    rewrite = "a brown dog runs across the grass in a park"
    (d,), _ = _run({ORIGINAL: FAIL, rewrite: 90}, [_g(rewrite)])
    assert d.reason == decide.RESCORE_FAILED and d.caption is None


def test_compare_needs_columns():
    with pytest.raises(ValueError, match="compare"):
        Decider(DecisionOptions(), [])
