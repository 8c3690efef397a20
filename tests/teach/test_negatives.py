"""The negative-sample generator: each kind changes the caption as its name says, deterministically per seed."""

from __future__ import annotations

import re

import pytest

from mlmfilter.teach.negatives import (
    ATTRIBUTE_GROUPS,
    BOILERPLATE,
    CORRUPTION_KINDS,
    NOUN_GROUPS,
    NUMBER_WORDS,
    Negative,
    NegativeGenerator,
)

CAPTION = "Two dogs are playing with a red ball on the green grass ."
OTHERS = ("A man rides a bike down the street .", CAPTION, "  ")


def by_kind(negatives: list[Negative]) -> dict[str, Negative]:
    kinds = [n.kind for n in negatives]
    assert len(kinds) == len(set(kinds)), "one negative per kind"
    return {n.kind: n for n in negatives}


def changed_words(a: str, b: str) -> list[tuple[str, str]]:
    wa, wb = a.split(), b.split()
    assert len(wa) == len(wb)
    return [(x, y) for x, y in zip(wa, wb) if x != y]


@pytest.fixture(scope="module")
def negatives() -> dict[str, Negative]:
    return by_kind(NegativeGenerator(seed=0).corrupt(CAPTION, uid="u1", other_captions=OTHERS))


def test_every_kind_applies_to_a_rich_caption_and_none_is_a_copy(negatives):
    assert list(negatives) == list(CORRUPTION_KINDS)
    for n in negatives.values():
        assert n.original == CAPTION and n.caption.strip() and n.caption != CAPTION and n.detail


def test_other_caption_is_another_pairs_caption(negatives):
    assert negatives["other_caption"].caption == OTHERS[0]  # the identical and the blank one are never picked
    alone = NegativeGenerator(kinds=["other_caption"]).corrupt(CAPTION, uid="u1", other_captions=[CAPTION, " "])
    assert alone == []


def test_swap_noun_replaces_one_noun_by_one_of_its_class_and_number(negatives):
    ((old, new),) = changed_words(CAPTION, negatives["swap_noun"].caption)
    groups = {form: (g, i) for g, pairs in NOUN_GROUPS.items() for pair in pairs for i, form in enumerate(pair)}
    assert old in ("dogs", "ball", "grass") and new != old
    assert groups[new] == groups[old]  # same class (animals / objects / ground) and same number
    assert negatives["swap_noun"].detail == f"{old}->{new}"


def test_swap_attribute_replaces_a_colour_by_another_colour(negatives):
    ((old, new),) = changed_words(CAPTION, negatives["swap_attribute"].caption)
    colours = ATTRIBUTE_GROUPS["colour"]
    assert old in ("red", "green") and new in colours and new != old


def test_swap_count_changes_the_number(negatives):
    ((old, new),) = changed_words(CAPTION, negatives["swap_count"].caption)
    assert old == "Two" and new.lower() in NUMBER_WORDS and new != "Two" and new[0].isupper()
    (digits,) = NegativeGenerator(kinds=["swap_count"]).corrupt("3 kids on 1 sofa", uid="d")
    assert changed_words("3 kids on 1 sofa", digits.caption)[0][1].isdigit()
    # no number: an article + a known singular noun becomes a count + its plural
    (article,) = NegativeGenerator(kinds=["swap_count"]).corrupt("A dog runs on the beach .", uid="a")
    count, plural = article.caption.split()[:2]
    assert count.lower() in NUMBER_WORDS[1:5] and plural == "dogs"
    assert NegativeGenerator(kinds=["swap_count"]).corrupt("The grass is wet .", uid="n") == []


def test_shuffle_keeps_the_words_and_the_final_period(negatives):
    shuffled = negatives["shuffle_words"].caption
    assert sorted(shuffled.split()) == sorted(CAPTION.split()) and shuffled.endswith(" .")
    assert shuffled.split()[:-1] != CAPTION.split()[:-1]


def test_truncate_keeps_at_most_half_the_words_from_the_start(negatives):
    words, kept = CAPTION.split(), negatives["truncate"].caption.split()
    assert 2 <= len(kept) <= len(words) // 2 and kept == words[: len(kept)]


def test_typos_edit_characters_inside_a_few_words(negatives):
    typo = negatives["typos"].caption
    changes = changed_words(CAPTION, typo)
    assert 1 <= len(changes) <= 3
    for old, new in changes:
        assert one_edit(old.rstrip("."), new.rstrip(".")), (old, new)


def one_edit(a: str, b: str) -> bool:
    """b is a with one character dropped, doubled or replaced, or two neighbours swapped."""
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]])
    short, long = sorted((a, b), key=len)
    return len(long) == len(short) + 1 and any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def test_boilerplate_comes_from_the_alt_text_templates(negatives):
    patterns = [
        re.escape(t)
        .replace(r"\{n:04d\}", r"\d{4}")
        .replace(r"\{n:05d\}", r"\d{5}")
        .replace(r"\{k\}", r"\d")
        .replace(r"\{m\}", r"\d")
        for t in BOILERPLATE
    ]
    assert any(re.fullmatch(p, negatives["boilerplate"].caption) for p in patterns)


def test_deterministic_for_seed_uid_and_caption_and_independent_of_the_kind_subset():
    gen = NegativeGenerator(seed=7)
    first = gen.corrupt(CAPTION, uid="u1", other_captions=OTHERS)
    assert NegativeGenerator(seed=7).corrupt(CAPTION, uid="u1", other_captions=OTHERS) == first
    subset = NegativeGenerator(seed=7, kinds=["typos", "swap_noun"]).corrupt(CAPTION, uid="u1", other_captions=OTHERS)
    assert subset == [n for n in first if n.kind in ("swap_noun", "typos")]
    others = [NegativeGenerator(seed=s).corrupt(CAPTION, uid="u1", other_captions=OTHERS) for s in range(8, 12)]
    assert any(o != first for o in others)
    assert NegativeGenerator(seed=7).corrupt(CAPTION, uid="u2", other_captions=OTHERS) != first


def test_kinds_that_cannot_apply_are_absent():
    kinds = {n.kind for n in NegativeGenerator().corrupt("sunset", uid="s")}
    assert kinds == {"typos", "boilerplate", "swap_noun"}  # no other caption, too short to shuffle or cut
    assert [n.kind for n in NegativeGenerator().corrupt("", uid="e")] == ["boilerplate"]


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown corruption kinds"):
        NegativeGenerator(kinds=["swap_verb"])


def test_rewrite_pairs_for_the_enhancement_task():
    unrelated, poor = NegativeGenerator().rewrite_pairs(CAPTION, uid="u1", other_captions=OTHERS)
    assert (unrelated.kind, unrelated.caption, unrelated.target) == ("unrelated_caption", OTHERS[0], CAPTION)
    assert poor.kind == "poor_caption" and poor.target is None and poor.caption != CAPTION


def test_real_flickr_captions_all_get_real_negatives(flickr_pairs):
    captions = [c for _, c in flickr_pairs[:40]]
    gen = NegativeGenerator(seed=0)
    seen = set()
    for i, caption in enumerate(captions):
        for n in gen.corrupt(caption, uid=str(i), other_captions=captions):
            assert " ".join(n.caption.lower().split()) != " ".join(caption.lower().split())
            seen.add(n.kind)
    assert seen == set(CORRUPTION_KINDS)


def test_the_article_follows_the_swapped_word():
    results = [
        NegativeGenerator(seed=s, kinds=["swap_attribute", "swap_noun"]).corrupt(
            "A pink dress near an apple .", uid="a"
        )
        for s in range(12)
    ]
    for negative in (n for r in results for n in r):
        words = negative.caption.split()
        for article, word in zip(words, words[1:]):
            if article.lower() in ("a", "an"):
                assert article.lower() == ("an" if word[0].lower() in "aeiou" else "a"), negative.caption
