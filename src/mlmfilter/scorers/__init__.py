"""Scorer registry. Scorers are imported lazily so that `rules` never pays for torch."""

from __future__ import annotations

import importlib
from typing import Any

from mlmfilter.scorers.base import Scorer, ScoreFailure, ScorerOptions, ScorerStats

#: name -> "module:Class"; each class has a pydantic ``Options`` model for its settings
REGISTRY: dict[str, str] = {
    "rules": "mlmfilter.scorers.rules:RulesScorer",
    "clip": "mlmfilter.scorers.clip:ClipScorer",
    "mlm": "mlmfilter.scorers.mlm:MLMScorer",
}


def scorer_class(name: str) -> type[Scorer]:
    try:
        target = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def build_scorer(name: str, options: dict[str, Any] | None = None) -> Scorer:
    """Build a scorer from its registry name and a dict of options (validated by its Options model)."""
    cls = scorer_class(name)
    opts = cls.Options(**(options or {}))
    return cls(opts)


__all__ = ["Scorer", "ScorerOptions", "ScoreFailure", "ScorerStats", "REGISTRY", "scorer_class", "build_scorer"]
