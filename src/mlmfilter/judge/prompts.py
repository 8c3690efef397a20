"""The MLM-Filter scoring prompts, character for character, and how one is filled in.

The released judges were fine-tuned on one fixed prompt per metric, so the text is data
(``prompts.json``, package data copied from the public reference scoring scripts), never
rewritten here. A prompt is ``template.format(caption=..., criteria=..., aspect=...)`` where
``aspect`` is the long metric name with ``_`` replaced by a space. The image placeholder and the
conversation around the prompt are added later (:mod:`mlmfilter.judge.conversations`).
"""

from __future__ import annotations

import functools
import json
import string
from dataclasses import dataclass
from importlib import resources
from typing import Iterable, Sequence

from mlmfilter.core.ids import canonical_sha256

#: long metric name -> short column name, in the reference order
METRICS: dict[str, str] = {
    "image_text_matching": "itm",
    "object_detail_fulfillment": "odf",
    "caption_text_quality": "ctq",
    "semantic_understanding": "su",
}
SHORT_TO_LONG: dict[str, str] = {short: long for long, short in METRICS.items()}
TEMPLATE_FIELDS = frozenset({"caption", "criteria", "aspect"})


@functools.lru_cache(maxsize=1)
def reference_prompts() -> dict:
    """The exact reference strings (``template_v1``, ``template_v2``, ``criteria``) shipped with the package."""
    text = resources.files("mlmfilter.judge").joinpath("prompts.json").read_text(encoding="utf-8")
    return json.loads(text)


def resolve_metrics(spec: str | Iterable[str] | None) -> list[str]:
    """``"itm,odf"``, ``["image_text_matching", "su"]`` or ``"all"`` -> long names, in the given order, deduplicated."""
    if spec is None:
        items: list[str] = ["all"]
    elif isinstance(spec, str):
        items = [part for part in spec.replace(" ", ",").split(",") if part]
    else:
        items = [str(part) for part in spec]
    if not items:
        raise ValueError("no metric given; choose from " + ", ".join([*METRICS.values(), *METRICS, "all"]))
    names: list[str] = []
    for item in items:
        key = item.strip().lower()
        if key == "all":
            candidates = list(METRICS)
        elif key in METRICS:
            candidates = [key]
        elif key in SHORT_TO_LONG:
            candidates = [SHORT_TO_LONG[key]]
        else:
            known = ", ".join([*METRICS.values(), *METRICS, "all"])
            raise ValueError(f"unknown metric {item!r}; known: {known}")
        names.extend(name for name in candidates if name not in names)
    return names


def short_name(metric: str) -> str:
    return METRICS[metric]


def aspect(metric: str) -> str:
    """The ``{aspect}`` field: the reference writes ``task.replace("_", " ")``."""
    return metric.replace("_", " ")


@dataclass(frozen=True)
class PromptTemplate:
    """An outer template (``v1``, ``v2`` or a user's own) with the per-metric criteria."""

    name: str  # "v1", "v2" or "custom"
    text: str
    criteria: dict[str, str]

    def render(self, metric: str, caption: str) -> str:
        """The user-turn text for one metric, without the image placeholder."""
        return self.text.format(caption=caption, criteria=self.criteria[metric], aspect=aspect(metric))

    def sha256(self, metrics: Sequence[str]) -> str:
        """Fingerprint of the exact texts a run sends: the template and the criteria of ``metrics``."""
        payload = {"template": self.text, "criteria": {m: self.criteria[m] for m in metrics}}
        return canonical_sha256(payload, ensure_ascii=False)


def resolve_template(spec: str = "v2") -> PromptTemplate:
    """``"v2"`` (later Llama-3/Qwen judges), ``"v1"`` (LLaVA-1.5 13B judges) or a custom template string.

    A custom template must contain ``{caption}``; it may use ``{criteria}`` and ``{aspect}``.
    """
    ref = reference_prompts()
    criteria = dict(ref["criteria"])
    key = spec.strip().lower() if isinstance(spec, str) else spec
    if key in ("v1", "v2"):
        return PromptTemplate(key, ref[f"template_{key}"], criteria)
    validate_template(spec)
    return PromptTemplate("custom", spec, criteria)


def validate_template(text: str) -> None:
    """Raise ValueError unless ``text`` is a format string over caption/criteria/aspect holding {caption}."""
    if not isinstance(text, str) or not text:
        raise ValueError("template must be 'v1', 'v2' or a non-empty string containing {caption}")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:
        raise ValueError(f"template is not a valid format string: {exc}") from None
    unknown = sorted({f for f in fields if f not in TEMPLATE_FIELDS})
    if unknown:
        raise ValueError(
            f"template uses unknown field(s) {unknown}; allowed: {{caption}}, {{criteria}}, {{aspect}} "
            "(write literal braces as {{ and }})"
        )
    if "caption" not in fields:
        raise ValueError("template must contain {caption}, or it does not show the judge the caption")
