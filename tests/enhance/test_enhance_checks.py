"""Acceptance checks on real text: every reject reason, and minimal rewrites that must pass."""

from __future__ import annotations

import pytest

from mlmfilter.enhance import checks
from mlmfilter.enhance.checks import CaptionChecker, CheckOptions, numbers_in
from mlmfilter.enhance.prompts import EnhancePrompts

ORIGINAL = "Barack Obama shakes hands with 3 workers at the Nikon factory in Osaka in 2009"


@pytest.fixture(scope="module")
def checker() -> CaptionChecker:
    return CaptionChecker(CheckOptions(), EnhancePrompts().instruction_texts("rewrite"))


def _check(checker, candidate, original=ORIGINAL, truncated=False):
    facts = checker.facts([original])[0]
    return checker.check(facts, candidate, truncated)


def test_facts_of_the_original(checker):
    facts = checker.facts([ORIGINAL, "Un chien noir court dans l'herbe verte du jardin public", "IMG_0042.jpg"])
    assert facts[0].language == "en"
    assert facts[0].numbers == ["3", "2009"]
    assert {"Barack Obama", "Nikon", "Osaka"} <= set(facts[0].entities)
    assert facts[1].language == "fr" and facts[1].entities == []  # the English NER is not run on French
    assert facts[2].language is None and facts[2].numbers == []  # too short to tell; an id is no number


@pytest.mark.parametrize(
    "candidate",
    [
        "Barack Obama shakes hands with three workers at the Nikon factory in Osaka in 2009.",
        "In 2009, Barack Obama greets 3 smiling workers inside the Nikon factory in Osaka, Japan",
    ],
)
def test_minimal_rewrites_pass(checker, candidate):
    result = _check(checker, candidate)
    assert result.passed, result


@pytest.mark.parametrize(
    "candidate, reason",
    [
        ("   ", checks.EMPTY),
        ("...", checks.EMPTY),
        ("Barack Obama", checks.TOO_SHORT),
        (ORIGINAL + ", " + "and a long list of things nobody asked about, " * 8, checks.TOO_LONG),
        (
            "Barack Obama shakes hands with 3 workers at the Nikon factory in Osaka in 2009<|im_end|>",
            checks.LEAKED_TEMPLATE,
        ),
        (
            "ASSISTANT: Barack Obama shakes hands with 3 workers at the Nikon factory in Osaka in 2009",
            checks.LEAKED_TEMPLATE,
        ),
        (
            '{"caption": "Barack Obama shakes hands with 3 workers at the Nikon factory in Osaka in 2009"}',
            checks.LEAKED_JSON,
        ),
        (
            "Rewrite the caption so that it describes the image correctly: Barack Obama meets 3 workers "
            "at the Nikon factory in Osaka in 2009",
            checks.LEAKED_PROMPT,
        ),
        (
            "Here's a rewritten version: Barack Obama shakes hands with 3 workers at the Nikon factory in Osaka in 2009",
            checks.LEAKED_PROMPT,
        ),
        ("Sure! Barack Obama shakes hands with 3 workers at the Nikon factory in Osaka in 2009", checks.LEAKED_PROMPT),
        ("I'm sorry, but I cannot identify the people in this image of the Nikon factory in Osaka.", checks.REFUSAL),
        ("barack obama shakes hands with 3 workers at the Nikon factory in Osaka, in 2009!", checks.COPY),
        (
            "Barack Obama serre la main de 3 ouvriers dans l'usine Nikon d'Osaka en 2009, devant les machines",
            checks.LANGUAGE_CHANGED,
        ),
        ("Barack Obama shakes hands with several workers at the Nikon factory in Osaka in 2009", checks.LOST_NUMBER),
        ("Barack Obama shakes hands with 3 workers at a camera factory in Osaka in 2009", checks.LOST_ENTITY),
    ],
)
def test_each_reject_reason(checker, candidate, reason):
    result = _check(checker, candidate)
    assert result.reason == reason, result
    assert result.detail


def test_truncated_candidates_are_rejected(checker):
    fine = "Barack Obama shakes hands with three workers at the Nikon factory in Osaka in 2009."
    assert _check(checker, fine).passed
    assert _check(checker, fine, truncated=True).reason == checks.TRUNCATED


def test_what_the_original_already_has_is_not_a_leak(checker):
    original = 'USER: a "photo": my cat {2019}'
    assert _check(checker, 'USER: a "photo": my grey cat on the sofa {2019}', original).passed


def test_options_switch_checks_off():
    loose = CaptionChecker(
        CheckOptions(keep_entities=False, keep_numbers=False, check_language=False, reject_copies=False)
    )
    facts = loose.facts([ORIGINAL])[0]
    assert facts.entities == [] and facts.numbers == []
    assert loose.check(facts, "Barack Obama shakes hands with workers at a factory").passed
    assert loose.check(facts, ORIGINAL).passed


def test_numbers_in():
    assert numbers_in("3 dogs, 1,000 people, 3.5 kg at 12:30 in DSC_0042 and IMG0042") == ["3", "1000", "3.5", "12:30"]
