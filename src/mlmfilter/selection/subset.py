"""DataComp subset files: the uids of the kept pairs as a sorted, unique ``.npy`` array.

The format is DataComp's (``--subset_file`` of its resharder and training scripts): a numpy
structured array of dtype ``[("f0", "<u8"), ("f1", "<u8")]`` -- the first and last 16 hex
characters of each uid as unsigned integers -- sorted by (f0, f1), without duplicates, written
with ``np.save``. Uids are gathered as per-batch arrays, never as Python objects, so 100M uids
cost 1.6 GB plus the sort's index, nothing more.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mlmfilter.io.uid import HALVES_DTYPE, empty_halves, is_sorted_halves, sort_halves
from mlmfilter.io.writers import AtomicFile


class SubsetAccumulator:
    """Collects uid halves batch by batch; :meth:`write` sorts, de-duplicates and saves them."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self.rows = 0

    def add(self, halves: np.ndarray) -> None:
        if len(halves):
            self._parts.append(np.asarray(halves, dtype=HALVES_DTYPE))
            self.rows += len(halves)

    def write(self, path: str | os.PathLike) -> int:
        """Save the subset file; returns the number of unique uids written. The collected
        parts are released first, so the peak is the uids, their sorted copy and the order."""
        parts, self._parts = self._parts, []
        combined = np.concatenate(parts) if parts else empty_halves()
        del parts
        return _save(unique_sorted_halves(combined), path)


def unique_sorted_halves(halves: np.ndarray) -> np.ndarray:
    """Sorted by (f0, f1), duplicates dropped."""
    halves = sort_halves(halves)
    if len(halves) < 2:
        return halves
    repeated = (halves["f0"][1:] == halves["f0"][:-1]) & (halves["f1"][1:] == halves["f1"][:-1])
    return halves[np.concatenate([[True], ~repeated])] if repeated.any() else halves


def write_datacomp_subset(halves: np.ndarray, path: str | os.PathLike) -> int:
    """Sort, de-duplicate and ``np.save`` uid halves to ``path`` atomically; returns the count."""
    return _save(unique_sorted_halves(halves), path)


def _save(subset: np.ndarray, path: str | os.PathLike) -> int:
    with AtomicFile(path) as out:
        np.save(out.file, subset, allow_pickle=False)
    return len(subset)


def read_datacomp_subset(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """Load a subset file, checking that it is one: the (f0, f1) uint64 dtype, sorted, unique."""
    path = Path(path)
    subset = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    if subset.dtype != HALVES_DTYPE:
        raise ValueError(f"{path} is not a DataComp subset file: dtype {subset.dtype}, expected {HALVES_DTYPE}")
    if subset.ndim != 1:
        raise ValueError(f"{path} is not a DataComp subset file: shape {subset.shape}, expected one dimension")
    if not mmap and not is_sorted_halves(subset):
        raise ValueError(f"{path} is not sorted by (f0, f1), as DataComp subset files must be")
    return subset
