"""AITQE's answer parser on realistic outputs: complete, early-stopped, cut at the token limit, malformed."""

from __future__ import annotations

import json

from mlmfilter.judge.aitqe import parse_aitqe, text_before_score

# hanhuang22/AITQE README, the --output_all example
COMPLETE = (
    '{"Recaption": "A man stands in front of a checklist of customer service questions, including \'Do you take '
    'each customer seriously?\' and \'Do you qualify customers properly?\'", "Overall Score": "2<Overall>", '
    '"Overall Explanation": "The caption is vague and does not accurately describe the image or its content.", '
    '"Text Quality Score": 3, "Text Quality Explanation": "The caption is grammatically correct but lacks clarity.", '
    '"Image-Text Matching Score": 2, "Image-Text Matching Explanation": "The caption does not describe the image.", '
    '"Object Detail Score": 2, "Object Detail Explanation": "No details about the checklist.", '
    '"Semantic Understanding Score": 2, "Semantic Understanding Explanation": "No understanding of the context.", '
    '"Text/Chart Description Score": 2, "Text/Chart Description Explanation": "The text in the image is not described."}'
)


def test_complete_answer():
    answer = parse_aitqe(COMPLETE)
    assert answer.ok and answer.complete and not answer.problems
    assert answer.overall == 2.0
    assert answer.aspects == {
        "text_quality": 3.0,
        "image_text_matching": 2.0,
        "object_detail": 2.0,
        "semantic_understanding": 2.0,
        "text_chart": 2.0,
    }
    assert answer.recaption == json.loads(COMPLETE)["Recaption"]
    assert answer.explanations["overall"].startswith("The caption is vague")


def test_early_stopped_answer_as_the_released_script_returns_it():
    # generation stopped at "<Overall>"; the token ran on to '">' , the script then does outputs[:-1] + "}"
    generated = '{"Overall Score": "9<Overall>",'
    answer = parse_aitqe(generated[:-1] + "}")
    assert answer.ok and answer.overall == 9.0 and answer.recaption is None
    assert not answer.complete and all(v is None for v in answer.aspects.values())
    # the same stop where the last token ended right at the marker: not valid JSON, still read
    answer = parse_aitqe('{"Recaption": "A red \\"Mirage\\" card.", "Overall Score": "5<Overall')
    assert answer.overall == 5.0 and answer.recaption == 'A red "Mirage" card.'


def test_truncated_at_the_token_limit():
    cut = COMPLETE[: COMPLETE.index("Object Detail Explanation") + 40]
    answer = parse_aitqe(cut)
    assert answer.ok and answer.overall == 2.0 and not answer.complete
    assert answer.aspects["object_detail"] == 2.0 and answer.aspects["semantic_understanding"] is None
    # cut inside the recaption: no score yet -> not ok, the problem is named
    answer = parse_aitqe('{"Recaption": "A man stands in front of a chec')
    assert not answer.ok and answer.recaption == "A man stands in front of a chec"
    assert "the recaption is cut off" in answer.problems and "no overall score" in answer.problems


def test_malformed_answers():
    for text in ("", "The caption is fine.", '{"Overall Score": "high"}', "Score: 7"):
        answer = parse_aitqe(text)
        assert not answer.ok and answer.overall is None
    # single spaces lost / a quoted number without the marker still read
    answer = parse_aitqe('{"Overall Score":"7", "Text Quality Score":"8"}')
    assert answer.overall == 7.0 and answer.aspects["text_quality"] == 8.0


def test_text_before_score_marks_where_the_digits_start():
    assert text_before_score(COMPLETE).endswith('"Overall Score": "')
    assert COMPLETE[len(text_before_score(COMPLETE))] == "2"
    assert text_before_score('{"Recaption": "x"') is None
