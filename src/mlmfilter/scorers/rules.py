"""DataComp's basic filter, exposed as scores and one pass/fail flag.

DataComp ("basic filtering" baseline): English caption (fastText LID there; py3langid here,
which ships its model so nothing is downloaded at run time), more than 2 words and more than
5 characters, image shorter side >= 200 px, aspect ratio < 3.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Sequence

import pyarrow as pa

from mlmfilter.core.sample import Sample
from mlmfilter.scorers.base import Scorer, ScorerOptions


class RulesOptions(ScorerOptions):
    batch_size: int = 256
    min_words: int = 3
    min_chars: int = 6
    min_side: int = 200
    max_aspect_ratio: float = 3.0
    language: str = "en"
    min_language_prob: float = 0.5


class RulesScorer(Scorer):
    name = "rules"
    Options = RulesOptions
    columns = {
        "rules_words": pa.int32(),
        "rules_chars": pa.int32(),
        "rules_min_side": pa.int32(),
        "rules_aspect_ratio": pa.float32(),
        "rules_lang": pa.string(),
        "rules_lang_prob": pa.float32(),
        "rules_ok": pa.bool_(),
        "rules_failed": pa.string(),  # the failed rules, comma-separated ("" when rules_ok)
    }
    image_size = None  # needs only the original size, which the decoder records

    options: RulesOptions

    @cached_property
    def _identifier(self):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def setup(self) -> None:
        self._identifier  # load the language model once per worker

    def score_batch(self, samples: Sequence[Sample]) -> list[dict[str, Any]]:
        return [self._score_one(s) for s in samples]

    def _score_one(self, sample: Sample) -> dict[str, Any]:
        opts = self.options
        caption = sample.caption or ""
        words = len(caption.split())
        chars = len(caption.strip())
        lang, prob = self._identifier.classify(caption)
        # the probability of the wanted language, not of the winner: a caption can be 45% English
        lang_prob = prob if lang == opts.language else self._prob_of(caption, opts.language)
        width, height = sample.width or 0, sample.height or 0
        min_side = min(width, height)
        aspect = max(width, height) / min_side if min_side else float("inf")
        checks = {
            "min_words": words >= opts.min_words,
            "min_chars": chars >= opts.min_chars,
            "min_side": min_side >= opts.min_side,
            "max_aspect_ratio": aspect < opts.max_aspect_ratio,
            "language": lang_prob >= opts.min_language_prob,
        }
        failed = [name for name, passed in checks.items() if not passed]
        return {
            "rules_words": words,
            "rules_chars": chars,
            "rules_min_side": min_side,
            "rules_aspect_ratio": aspect,
            "rules_lang": lang,
            "rules_lang_prob": lang_prob,
            "rules_ok": not failed,
            "rules_failed": ",".join(failed),
        }

    def _prob_of(self, text: str, language: str) -> float:
        return dict(self._identifier.rank(text)).get(language, 0.0)

    def provenance(self) -> dict[str, Any]:
        import py3langid

        return {
            **super().provenance(),
            "thresholds": self.options.model_dump(exclude={"batch_size"}),
            "language_detector": f"py3langid {getattr(py3langid, '__version__', '?')} (normalised probabilities)",
            "reference": "DataComp basic filtering (Gadre et al. 2023)",
        }
