"""AITQE (arXiv 2410.16166): its exact prompt, a tolerant parser of its dict-like answer, its readouts.

The model reads raw text (``aitqe`` conversation format: no chat template, no BOS): the image span,
its processor's newline, then ``"\\n" + QUESTION`` (hanhuang22/AITQE ``inference.py``
``process_prompt``). It answers greedily (up to 384 new tokens) with a dict such as::

    {"Recaption": "...", "Overall Score": "2<Overall>", "Overall Explanation": "...",
     "Text Quality Score": 3, "Text Quality Explanation": "...", "Image-Text Matching Score": 2, ...}

``Recaption`` comes first and only when the model judges the caption poor. The released script's
early-stop mode stops at ``<Overall>`` and closes the dict by hand (``outputs[:-1] + "}"``), which is
valid JSON only by luck; :func:`parse_aitqe` therefore reads the fields with tolerant patterns, from
complete, early-stopped, truncated (token limit) and slightly malformed outputs alike. Output
without an overall score is a failure that keeps the raw text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

QUESTION = (
    "Evaluate the caption: {caption}\nif score is low, give a short description of the image.\n"
    "Respond using a dictionary structure."
)
#: the released script's early stop
OVERALL_MARKER = "<Overall>"
#: the text right before the overall score's digits: where the ``expected`` readout reads
OVERALL_CUE = '"Overall Score": "'
MAX_NEW_TOKENS = 384
#: output column suffix -> the aspect's name in AITQE's answer
ASPECTS: dict[str, str] = {
    "text_quality": "Text Quality",
    "image_text_matching": "Image-Text Matching",
    "object_detail": "Object Detail",
    "semantic_understanding": "Semantic Understanding",
    "text_chart": "Text/Chart Description",
}

_STRING_BODY = r'((?:[^"\\]|\\.)*)'
_NUMBER = r"(-?\d+(?:\.\d+)?)"


def prompt(caption: str) -> str:
    """The question after the image span (the ``aitqe`` format adds the image and both newlines)."""
    return QUESTION.format(caption=caption)


def _unescape(body: str) -> str:
    try:
        return json.loads('"' + body + '"')
    except json.JSONDecodeError:  # a cut-off escape at the end of a truncated answer
        return body.replace('\\"', '"').replace("\\n", "\n").rstrip("\\")


def _string_field(text: str, name: str) -> tuple[str | None, bool]:
    """(value, closed): the string value of ``"name": "..."``; closed=False when the answer ends inside it."""
    match = re.search(r'"' + re.escape(name) + r'"\s*:\s*"' + _STRING_BODY + r'("?)', text, flags=re.S)
    if match is None:
        return None, False
    return _unescape(match.group(1)), bool(match.group(2))


def _number_field(text: str, name: str) -> float | None:
    """``"name": 3`` or ``"name": "3<Overall>"`` (a quoted number, with or without the marker)."""
    match = re.search(r'"' + re.escape(name) + r'"\s*:\s*"?\s*' + _NUMBER, text)
    return float(match.group(1)) if match else None


@dataclass
class AitqeAnswer:
    overall: float | None
    aspects: dict[str, float | None]
    recaption: str | None
    explanations: dict[str, str] = field(default_factory=dict)
    complete: bool = False  # every aspect score is present
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.overall is not None


def parse_aitqe(text: str) -> AitqeAnswer:
    """Read AITQE's answer however it ended (complete, early-stopped, cut at the token limit)."""
    raw = text or ""
    problems: list[str] = []
    recaption, closed = _string_field(raw, "Recaption")
    if recaption is not None and not closed:
        problems.append("the recaption is cut off")
    overall = _number_field(raw, "Overall Score")
    if overall is None:
        problems.append("no overall score")
    aspects = {key: _number_field(raw, f"{name} Score") for key, name in ASPECTS.items()}
    explanations = {}
    for key, name in {"overall": "Overall", **ASPECTS}.items():
        value, _ = _string_field(raw, f"{name} Explanation")
        if value is not None:
            explanations[key] = value
    return AitqeAnswer(
        overall=overall,
        aspects=aspects,
        recaption=recaption,
        explanations=explanations,
        complete=all(v is not None for v in aspects.values()),
        problems=problems,
    )


def text_before_score(text: str) -> str | None:
    """The answer up to and including ``"Overall Score": "`` (where the score's digits start), or None."""
    at = text.find(OVERALL_CUE)
    return None if at < 0 else text[: at + len(OVERALL_CUE)]
