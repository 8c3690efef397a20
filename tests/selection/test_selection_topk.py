"""Exact top-k by radix select: against a brute-force sort, with ties, NaN, small candidate caps."""

from __future__ import annotations

import numpy as np
import pytest

from mlmfilter.io.uid import HALVES_DTYPE
from mlmfilter.selection.topk import RadixTopK, ScoreBatch, ScoreKeys, find_top_k, top_k_mask


class Stream:
    """Scores and uids held in numpy, streamed in fixed-size batches like the parquet scan."""

    def __init__(self, scores: np.ndarray, halves: np.ndarray, batch_rows: int):
        self.scores, self.halves, self.batch_rows = scores, halves, batch_rows
        self.eligible = ~np.isnan(scores) if scores.dtype.kind == "f" else np.ones(len(scores), bool)
        self.uid_rows_read = 0  # how many uid halves top-k asked for, over all passes

    def __call__(self, needs_uids: bool = True):
        for start in range(0, len(self.scores), self.batch_rows):
            stop = start + self.batch_rows
            yield ScoreBatch(
                self.scores[start:stop], self.eligible[start:stop], start, self._uid_reader(start, needs_uids)
            )

    def _uid_reader(self, start: int, allowed: bool):
        def read(rows: np.ndarray) -> np.ndarray:
            assert allowed, "top-k asked for uids in a pass that said it needs none"
            self.uid_rows_read += len(rows)
            return self.halves[start + rows]

        return read

    def selected(self, threshold, keys: ScoreKeys) -> np.ndarray:
        return np.concatenate([b.first_ordinal + np.flatnonzero(top_k_mask(b, threshold, keys)) for b in self()])


def random_halves(rng, n: int) -> np.ndarray:
    halves = np.empty(n, dtype=HALVES_DTYPE)
    halves["f0"] = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    halves["f1"] = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    return halves


def brute_force(scores: np.ndarray, halves: np.ndarray, k: int, ascending: bool = False) -> np.ndarray:
    """The documented order by a plain sort: better score, then smaller uid, then earlier row."""
    valid = np.flatnonzero(~np.isnan(scores)) if scores.dtype.kind == "f" else np.arange(len(scores))
    value = scores[valid].astype(np.float64)
    order = np.lexsort((valid, halves["f1"][valid], halves["f0"][valid], value if ascending else -value))
    return np.sort(valid[order[:k]])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("ascending", [False, True])
def test_matches_brute_force_sort_with_ties(seed, ascending):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2_000, 6_000))
    scores = np.round(rng.normal(0.3, 0.2, n), 2).astype(np.float32)  # ~100 distinct values: many ties
    scores[rng.random(n) < 0.05] = np.nan
    halves = random_halves(rng, n)
    stream = Stream(scores, halves, batch_rows=int(rng.integers(100, 900)))
    keys = ScoreKeys(scores.dtype, ascending=ascending)
    valid = int((~np.isnan(scores)).sum())
    passes = []
    for k in (1, int(rng.integers(2, valid)), valid // 2, valid - 1):
        threshold = find_top_k(stream, k, keys, candidate_cap=40)  # small cap: several radix passes
        passes.append(threshold.passes)
        selected = stream.selected(threshold, keys)
        assert len(selected) == k
        np.testing.assert_array_equal(selected, brute_force(scores, halves, k, ascending))
        last = brute_force(scores, halves, k, ascending)
        worst = last[
            np.lexsort(
                (
                    last,
                    halves["f1"][last],
                    halves["f0"][last],
                    scores[last] if ascending else -scores[last].astype(np.float64),
                )
            )[-1]
        ]
        assert threshold.boundary.uid == f"{halves['f0'][worst]:016x}{halves['f1'][worst]:016x}"
        assert threshold.boundary.score == float(str(scores[worst]))
    assert max(passes) >= 4  # a tie bigger than the cap: score digits, then a uid digit, then collect


def test_all_scores_equal_falls_through_to_uid_digits():
    rng = np.random.default_rng(7)
    n = 3_000
    scores = np.full(n, 0.5, dtype=np.float64)
    halves = random_halves(rng, n)
    stream = Stream(scores, halves, batch_rows=500)
    keys = ScoreKeys(np.float64)
    threshold = find_top_k(stream, 1_234, keys, candidate_cap=50)
    # 4 digits of the float64 score all land in one bin, then a uid digit splits the tie
    assert threshold.passes >= 6
    np.testing.assert_array_equal(stream.selected(threshold, keys), brute_force(scores, halves, 1_234))
    # the smaller uid wins: every kept uid is below every dropped one
    kept = np.zeros(n, bool)
    kept[stream.selected(threshold, keys)] = True
    assert np.max(halves["f0"][kept]) <= np.min(halves["f0"][~kept])


def test_duplicate_rows_still_give_exactly_k():
    rng = np.random.default_rng(3)
    halves = np.repeat(random_halves(rng, 50), 20)  # every (score, uid) appears 20 times
    scores = np.repeat(np.round(rng.random(50), 1), 20)
    stream = Stream(scores, halves, batch_rows=64)
    keys = ScoreKeys(np.float64)
    for k in (1, 19, 21, 333, 999):
        threshold = find_top_k(stream, k, keys, candidate_cap=8)
        selected = stream.selected(threshold, keys)
        np.testing.assert_array_equal(selected, brute_force(scores, halves, k))  # earlier rows first


def test_integer_and_bool_scores():
    rng = np.random.default_rng(11)
    n = 2_500
    halves = random_halves(rng, n)
    for scores in (
        rng.integers(-40, 40, n).astype(np.int64),
        rng.integers(0, 30, n).astype(np.int32),
        rng.random(n) < 0.3,
    ):
        keys = ScoreKeys(scores.dtype)
        stream = Stream(scores, halves, batch_rows=300)
        for k in (7, 1_000):
            threshold = find_top_k(stream, k, keys, candidate_cap=30)
            np.testing.assert_array_equal(stream.selected(threshold, keys), brute_force(scores, halves, k))


def test_k_edges():
    rng = np.random.default_rng(5)
    scores = np.round(rng.random(1_000), 1)
    scores[:100] = np.nan
    stream = Stream(scores, random_halves(rng, 1_000), batch_rows=128)
    keys = ScoreKeys(np.float64)
    nothing = find_top_k(stream, 0, keys)
    assert nothing.kept == 0 and len(stream.selected(nothing, keys)) == 0
    for k in (900, 5_000):  # every eligible row, or more than there are
        everything = find_top_k(stream, k, keys)
        assert everything.kept == 900 and everything.passes == 1 and everything.boundary is None
        np.testing.assert_array_equal(stream.selected(everything, keys), np.arange(100, 1_000))
    assert stream.uid_rows_read == 0  # keeping all or nothing never needed a uid


def test_uids_are_read_only_for_rows_near_the_boundary():
    rng = np.random.default_rng(9)
    n = 20_000
    scores = rng.random(n).astype(np.float32)  # distinct enough that the score digits decide
    stream = Stream(scores, random_halves(rng, n), batch_rows=2_048)
    find_top_k(stream, 6_000, ScoreKeys(np.float32), candidate_cap=1_000)
    assert stream.uid_rows_read <= 1_000  # only the collected candidates, not the 20k rows


def test_candidates_in_memory_stay_under_the_cap():
    rng = np.random.default_rng(2)
    n = 10_000
    scores = np.round(rng.random(n), 2)
    stream = Stream(scores, random_halves(rng, n), batch_rows=1_000)
    search = RadixTopK(ScoreKeys(np.float64), k=4_321, candidate_cap=77)
    while not search.done:
        for batch in stream(search.needs_uids):
            search.observe(batch)
            assert sum(len(part) for part in search._candidates) <= 77
        search.finish_pass()
    assert search.threshold.passes >= 4


def test_score_keys_preserve_order_and_invert():
    values = np.array([-np.inf, -1e30, -2.5, -1e-300, -0.0, 0.0, 1e-300, 0.5, 3.0, np.inf])
    for dtype in (np.float64, np.float32):
        cast = values.astype(dtype)
        for ascending in (False, True):
            keys = ScoreKeys(cast.dtype, ascending=ascending).keys(cast)
            order = np.argsort(keys, kind="stable")
            ranked = cast[order]
            assert np.all(np.diff(ranked) <= 0) if ascending else np.all(np.diff(ranked) >= 0)
            assert keys[4] == keys[5]  # -0.0 and 0.0 tie
            inverse = [ScoreKeys(cast.dtype, ascending=ascending).value(int(k)) for k in keys]
            assert inverse[3] == float(str(cast[3])) and inverse[-1] == np.inf and inverse[7] == 0.5
    ints = np.array([np.iinfo(np.int64).min, -5, 0, 7, np.iinfo(np.int64).max])
    keys = ScoreKeys(ints.dtype).keys(ints)
    assert np.all(np.diff(keys.astype(object)) > 0)
    assert [ScoreKeys(ints.dtype).value(int(k)) for k in keys] == ints.tolist()
    with pytest.raises(TypeError):
        ScoreKeys(np.dtype("U4"))
