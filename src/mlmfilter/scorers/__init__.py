"""Scorer registry. Scorers are imported lazily so that `rules` never pays for torch."""

from __future__ import annotations

import importlib
from typing import Any

from mlmfilter.scorers.base import ScoreFailure, Scorer, ScorerOptions, ScorerStats

#: name -> "module:Class"; each class has a pydantic ``Options`` model for its settings
REGISTRY: dict[str, str] = {
    "rules": "mlmfilter.scorers.rules:RulesScorer",
    "clip": "mlmfilter.scorers.clip:ClipScorer",
    "mlm": "mlmfilter.scorers.mlm:MLMScorer",
    "ocr": "mlmfilter.scorers.ocr:OcrScorer",
    "aitqe": "mlmfilter.scorers.aitqe:AITQEScorer",
    "unifilter": "mlmfilter.scorers.unifilter:UniFilterScorer",
    "embed": "mlmfilter.scorers.embed:EmbedScorer",
    "distilled": "mlmfilter.scorers.distilled:DistilledScorer",
}


def scorer_class(name: str) -> type[Scorer]:
    try:
        target = REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown scorer {name!r}{hint}; known: {', '.join(sorted(REGISTRY))}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def build_scorer(name: str, options: dict[str, Any] | None = None) -> Scorer:
    """Build a scorer from its registry name and a dict of options (validated by its Options model)."""
    import difflib

    from pydantic import ValidationError

    from mlmfilter.core.errors import validation_message

    cls = scorer_class(name)
    unknown = sorted(set(options or {}) - set(cls.Options.model_fields))
    if unknown:
        valid = sorted(cls.Options.model_fields)
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"scorer {name!r} has no option {unknown[0]!r}{hint}; its options: {', '.join(valid)}")
    try:
        opts = cls.Options(**(options or {}))
    except ValidationError as exc:
        raise ValueError(f"scorer {name!r}: {validation_message(exc)}") from None
    return cls(opts)


__all__ = ["Scorer", "ScorerOptions", "ScoreFailure", "ScorerStats", "REGISTRY", "scorer_class", "build_scorer"]
