"""Exact global top-k over streamed batches, in memory that does not grow with the number of rows.

Order: the higher score wins (the lower one with ``ascending=True``); on equal scores the smaller
uid wins, the uid read as a 128-bit unsigned integer; rows that also share the uid (duplicates)
are ordered by their position in the stream, earlier first. Rows whose score is null or NaN are
never selected. Every row thus has a unique composite key of four unsigned 64-bit words, larger
is better::

    (score key, ~uid_f0, ~uid_f1, ~ordinal)

where the score key maps the score to an unsigned integer in the same order. The k best rows are
exactly the rows whose key is >= the key of the k-th best row (the threshold).

The threshold is found by radix select over the key's 16-bit digits, most significant first.
Each streaming pass builds a 65536-bin histogram of the next digit among the rows that match the
digits fixed so far, which fixes one more digit. Once the rows matching the prefix are few
(``candidate_cap``), one more pass collects just them and numpy sorts them. Float32 scores with
ties rounded to 2 decimals typically need 2-3 passes; uid halves are only computed for rows that
match a prefix, so passes over the score digits read nothing but the score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

DIGIT_BITS = 16
BINS = 1 << DIGIT_BITS
UID_WORDS = 2  # the uid halves f0, f1
DEFAULT_CANDIDATE_CAP = 2_000_000  # rows kept in memory for the final sort: 2M x 32 bytes = 64 MB
_ALL_ONES = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


@dataclass
class ScoreBatch:
    """One streamed batch, as top-k sees it."""

    scores: np.ndarray  # raw score values (float, int or bool); rows outside `eligible` are ignored
    eligible: np.ndarray  # bool: rows that may be selected (filters passed, score present)
    first_ordinal: int  # the stream position of row 0; must be the same in every pass
    uid_halves: Callable[[np.ndarray], np.ndarray]  # row indices -> structured (f0, f1) uint64 array

    def __len__(self) -> int:
        return len(self.eligible)


class ScoreKeys:
    """Scores -> unsigned integer keys in the same order (the reverse order with ``ascending``).

    Floats use their IEEE bits (sign flipped, negatives inverted), signed integers the flipped
    sign bit; -0.0 is folded into +0.0 so that equal scores have equal keys. NaN gets a key too:
    callers exclude it through ``eligible``.
    """

    def __init__(self, dtype: np.dtype, ascending: bool = False):
        dtype = np.dtype(dtype)
        if dtype.kind == "f":
            self.source = np.dtype(np.float64) if dtype.itemsize > 4 else np.dtype(np.float32)
        elif dtype.kind == "i":
            self.source = np.dtype(np.int64) if dtype.itemsize > 4 else np.dtype(np.int32)
        elif dtype.kind == "u":
            self.source = np.dtype(np.uint64) if dtype.itemsize > 4 else np.dtype(np.uint32)
        elif dtype.kind == "b":
            self.source = np.dtype(np.uint16)
        else:
            raise TypeError(f"cannot rank scores of dtype {dtype}: need a number or a bool")
        self.bits = self.source.itemsize * 8
        self.ascending = ascending
        self._mask = np.uint64((1 << self.bits) - 1)
        self._unsigned = np.dtype(f"u{self.source.itemsize}")
        self._sign = self._unsigned.type(1 << (self.bits - 1))

    @property
    def digits(self) -> int:
        return self.bits // DIGIT_BITS

    def keys(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values).astype(self.source, copy=False)
        if self.source.kind == "f":
            bits = (values + self.source.type(0)).view(self._unsigned)  # + 0 turns -0.0 into +0.0
            negative = (bits & self._sign) != 0
            bits = np.where(negative, ~bits, bits | self._sign)
        elif self.source.kind == "i":
            bits = values.view(self._unsigned) ^ self._sign
        else:
            bits = values
        keys = bits.astype(np.uint64)
        return (~keys & self._mask) if self.ascending else keys

    def value(self, key: int) -> float | int | bool:
        """The score that has this key (the inverse of :meth:`keys`)."""
        raw = (~key & int(self._mask)) if self.ascending else key
        bits = np.array([raw], dtype=self._unsigned)
        if self.source.kind == "f":
            positive = (bits & self._sign) != 0
            bits = np.where(positive, bits ^ self._sign, ~bits)
            # the shortest text of the value in its own precision: float32 0.98, not 0.9800000190734863
            return float(str(bits.view(self.source)[0]))
        if self.source.kind == "i":
            return int((bits ^ self._sign).view(self.source)[0])
        if self.source == np.uint16:
            return bool(bits[0])
        return int(bits[0])


@dataclass(frozen=True)
class BoundaryRow:
    """The k-th best row: the last one kept."""

    score: float | int | bool
    uid_f0: int
    uid_f1: int
    ordinal: int

    @property
    def uid(self) -> str:
        return f"{self.uid_f0:016x}{self.uid_f1:016x}"


@dataclass(frozen=True)
class TopKThreshold:
    """Rows whose composite key is >= ``key`` are the selected ones (none when ``kept`` is 0)."""

    key: tuple[int, int, int, int]
    kept: int  # min(k, eligible)
    eligible: int
    boundary: BoundaryRow | None  # None when nothing or every eligible row is kept
    passes: int

    @property
    def keeps_all(self) -> bool:
        return self.kept == self.eligible


class RadixTopK:
    """The radix-select state machine. Drive it pass by pass::

        search = RadixTopK(ScoreKeys(np.float32), k)
        while not search.done:
            for batch in stream(needs_uids=search.needs_uids):
                search.observe(batch)
            search.finish_pass()
        threshold = search.threshold

    ``k`` may be set after the first pass's batches were observed (the first pass needs no k),
    which lets a caller count the rows and histogram the first digit in one read.
    """

    def __init__(self, score_keys: ScoreKeys, k: int | None = None, candidate_cap: int = DEFAULT_CANDIDATE_CAP):
        if candidate_cap < 1:
            raise ValueError("candidate_cap must be at least 1")
        self.score_keys = score_keys
        self.k = k
        self.candidate_cap = candidate_cap
        self.passes = 0
        self.threshold: TopKThreshold | None = None
        self._eligible: int | None = None
        self._needed = 0  # how many more rows to take among the rows matching the prefix
        self._prefix = _Prefix(score_keys.digits)
        self._collecting = False
        self._histogram = np.zeros(BINS, dtype=np.int64)
        self._candidates: list[np.ndarray] = []

    @property
    def done(self) -> bool:
        return self.threshold is not None

    @property
    def needs_uids(self) -> bool:
        """Whether the next pass reads uids (the prefix reaches past the score, or collecting)."""
        return self._collecting or self._prefix.word >= 1

    def observe(self, batch: ScoreBatch) -> None:
        if self.done:
            raise RuntimeError("the top-k threshold is already known")
        words = _RowWords(batch, self.score_keys)
        self._prefix.narrow(words)
        if self._collecting:
            self._candidates.append(words.all_words())
        else:
            digit = self._prefix.next_digit(words)
            self._histogram += np.bincount(digit, minlength=BINS)

    def finish_pass(self) -> None:
        if self.k is None:
            raise RuntimeError("set k before the first pass ends")
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        self.passes += 1
        if self._collecting:
            self._finish_collecting()
            return
        histogram, self._histogram = self._histogram, np.zeros(BINS, dtype=np.int64)
        if self._eligible is None:  # the first pass: every eligible row is in the histogram
            self._eligible = int(histogram.sum())
            self._needed = self.k
            if self.k == 0 or self._eligible <= self.k:
                kept = min(self.k, self._eligible)
                self._finish((0, 0, 0, 0), kept, boundary=None)
                return
        # The bin holding the needed-th best row: everything in higher bins is kept outright.
        from_top = np.cumsum(histogram[::-1])
        position = int(np.searchsorted(from_top, self._needed))
        digit = BINS - 1 - position
        in_bin = int(histogram[digit])
        self._needed -= int(from_top[position]) - in_bin
        self._prefix.append(digit)
        if self._prefix.complete:  # only reachable with one row per full key
            key = self._prefix.key()
            self._finish(key, self.k, boundary=self._boundary(key))
        elif in_bin <= self.candidate_cap:
            self._collecting = True

    def _finish_collecting(self) -> None:
        candidates = np.concatenate(self._candidates) if self._candidates else np.zeros((0, 4), np.uint64)
        self._candidates = []
        if len(candidates) < self._needed:
            raise RuntimeError(
                f"the data changed between passes: expected at least {self._needed} candidates, found {len(candidates)}"
            )
        order = np.lexsort(candidates.T[::-1])  # ascending by word 0, then 1, 2, 3
        key = tuple(int(word) for word in candidates[order[len(candidates) - self._needed]])
        self._finish(key, self.k, boundary=self._boundary(key))

    def _finish(self, key: tuple[int, ...], kept: int, boundary: BoundaryRow | None) -> None:
        self.threshold = TopKThreshold(
            key=tuple(key), kept=kept, eligible=self._eligible, boundary=boundary, passes=self.passes
        )

    def _boundary(self, key: tuple[int, ...]) -> BoundaryRow:
        inverted = [int(~np.uint64(word)) for word in key[1:]]
        return BoundaryRow(self.score_keys.value(key[0]), inverted[0], inverted[1], inverted[2])


def find_top_k(
    stream: Callable[[bool], Iterable[ScoreBatch]],
    k: int,
    score_keys: ScoreKeys,
    candidate_cap: int = DEFAULT_CANDIDATE_CAP,
) -> TopKThreshold:
    """The threshold of the k best rows. ``stream(needs_uids)`` must yield the same rows in the
    same order on every call; with ``needs_uids`` false, ``uid_halves`` is never called."""
    search = RadixTopK(score_keys, k, candidate_cap)
    while not search.done:
        for batch in stream(search.needs_uids):
            search.observe(batch)
        search.finish_pass()
    return search.threshold


def top_k_mask(batch: ScoreBatch, threshold: TopKThreshold, score_keys: ScoreKeys) -> np.ndarray:
    """Which rows of ``batch`` are among the k best: one vectorized comparison against the
    threshold key. uid halves are computed only for rows that tie with the boundary score."""
    if threshold.kept == 0:
        return np.zeros(len(batch), dtype=bool)
    if threshold.keeps_all:
        return np.asarray(batch.eligible, dtype=bool).copy()
    words = _RowWords(batch, score_keys)
    score = words.word(0)
    boundary_score = np.uint64(threshold.key[0])
    kept = np.zeros(len(batch), dtype=bool)
    kept[words.rows[score > boundary_score]] = True
    words.keep(score == boundary_score)
    if len(words.rows):
        kept[words.rows] = _at_least(words, threshold.key)
    return kept


# -- internals ------------------------------------------------------------------------------------


class _RowWords:
    """The composite key words of a shrinking set of a batch's rows, computed on demand."""

    def __init__(self, batch: ScoreBatch, score_keys: ScoreKeys):
        self.batch = batch
        self.score_keys = score_keys
        self.rows = np.flatnonzero(batch.eligible)
        self._cache: dict[int, np.ndarray] = {}

    def word(self, index: int) -> np.ndarray:
        if index not in self._cache:
            if index == 0:
                self._cache[0] = self.score_keys.keys(self.batch.scores[self.rows])
            elif index <= UID_WORDS:
                halves = self.batch.uid_halves(self.rows)
                self._cache[1] = ~np.asarray(halves["f0"], dtype=np.uint64)
                self._cache[2] = ~np.asarray(halves["f1"], dtype=np.uint64)
            else:
                self._cache[3] = ~(np.uint64(self.batch.first_ordinal) + self.rows.astype(np.uint64))
        return self._cache[index]

    def keep(self, mask: np.ndarray) -> None:
        self.rows = self.rows[mask]
        self._cache = {index: values[mask] for index, values in self._cache.items()}

    def all_words(self) -> np.ndarray:
        if not len(self.rows):
            return np.zeros((0, 4), dtype=np.uint64)
        return np.stack([self.word(index) for index in range(4)], axis=1)


class _Prefix:
    """The digits fixed so far. Digits run through the score word (``score_digits`` of them),
    then four per uid half, then four for the ordinal."""

    def __init__(self, score_digits: int):
        self.widths = [score_digits, 4, 4, 4]  # digits per word
        self.words: list[int] = []  # fully fixed words
        self.partial = 0  # the fixed leading digits of the current word
        self.partial_digits = 0

    @property
    def word(self) -> int:
        """Index of the word the next digit belongs to."""
        return len(self.words)

    @property
    def complete(self) -> bool:
        return len(self.words) == len(self.widths)

    def append(self, digit: int) -> None:
        self.partial = (self.partial << DIGIT_BITS) | digit
        self.partial_digits += 1
        if self.partial_digits == self.widths[self.word]:
            self.words.append(self.partial)
            self.partial, self.partial_digits = 0, 0

    def narrow(self, words: _RowWords) -> None:
        """Keep only the rows whose leading digits equal the prefix."""
        for index, value in enumerate(self.words):
            if not len(words.rows):
                return
            words.keep(words.word(index) == np.uint64(value))
        if self.partial_digits and len(words.rows):
            words.keep((words.word(self.word) >> np.uint64(self._shift() + DIGIT_BITS)) == np.uint64(self.partial))

    def next_digit(self, words: _RowWords) -> np.ndarray:
        if not len(words.rows):
            return np.zeros(0, dtype=np.intp)
        digit = (words.word(self.word) >> np.uint64(self._shift())) & np.uint64(BINS - 1)
        return digit.astype(np.intp)

    def key(self) -> tuple[int, ...]:
        return tuple(self.words)

    def _shift(self) -> int:
        """Bit position of the next digit within its word."""
        return DIGIT_BITS * (self.widths[self.word] - self.partial_digits - 1)


def _at_least(words: _RowWords, key: tuple[int, ...]) -> np.ndarray:
    """Lexicographic ``row words >= key`` for rows that already equal key[0] in word 0."""
    greater = np.zeros(len(words.rows), dtype=bool)
    undecided = np.ones(len(words.rows), dtype=bool)
    for index in range(1, 4):
        values, bound = words.word(index), np.uint64(key[index])
        greater |= undecided & (values > bound)
        undecided &= values == bound
    return greater | undecided
